"""Pattern ``upload`` under faults: a client gone mid-upload, a truncated body,
uploads racing listings of one patient, and a database locked by another
writer. None may leave a partial file or a row without its file, answer with
a 500, or leave the server unhealthy."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.testclient import TestClient
from test_upload import (
    MIB,
    PATIENT,
    VARIANTS,
    Served,
    State,
    assert_error,
    database_path,
    file_part,
    form_headers,
    multipart,
    padded,
    raw_post,
    server_pool,
    state_of,
    stats,
    storage_path,
    upload_server,
    upload_url,
)

from reference_impl import imagegen
from reference_impl.app import create_app
from reference_impl.config import Settings
from reference_impl.server import dataset_locations

#: Seconds an SQLite connection waits for a lock in the contention tests.
BUSY_TIMEOUT_S = 0.3


@pytest.fixture(scope="module")
def dataset(ci_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the ``ci`` dataset; each test compares its own before
    and after, so the tests of this module share it."""
    copy = tmp_path_factory.mktemp("upload-faults") / "dataset"
    shutil.copytree(ci_dataset, copy)
    return copy


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return imagegen.make_image("bitewing", random.Random(3), scale=0.1)


def wait_for(condition, what: str, timeout_s: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    deadline = time.perf_counter() + timeout_s
    while not condition():
        if time.perf_counter() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.02)


def temp_files(dataset: Path) -> list[Path]:
    return list(storage_path(dataset).glob(".upload-*"))


@pytest.fixture(scope="module")
def servers(dataset, tmp_path_factory) -> Iterator[Callable[..., Served]]:
    with server_pool(dataset, tmp_path_factory.mktemp("logs")) as get:
        yield get


DISCONNECT_LINE = "client disconnected during an upload"


# -- a client that goes away, a body that stops short ------------------------


@pytest.mark.integration
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("upload_form", VARIANTS)
def test_client_gone_mid_upload_leaves_nothing(
    servers, dataset, jpeg, upload_form, framing
):
    server = upload_server(servers, upload_form)
    base = server.base_url
    disconnects_before = server.log().count(DISCONNECT_LINE)
    before = state_of(dataset)
    rss_before_mib = stats(base)["rssMib"]
    body = multipart(file_part(padded(jpeg, 8 * MIB)))
    url = urlsplit(base)
    head = [f"POST {upload_url()} HTTP/1.1", f"Host: {url.netloc}"]
    head += [f"{k}: {v}" for k, v in form_headers().items()]
    if framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        sent_part = b"%x\r\n%s\r\n" % (3 * MIB, body[: 3 * MIB])
    else:
        head.append(f"Content-Length: {len(body)}")
        sent_part = body[: 3 * MIB]
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + sent_part)
        if upload_form == "optimized":
            # The streamed form has begun writing the file.
            wait_for(lambda: temp_files(dataset), "a temporary file")
    wait_for(
        lambda: server.log().count(DISCONNECT_LINE) > disconnects_before,
        "the server noticing the disconnect",
    )
    assert temp_files(dataset) == []
    assert state_of(dataset) == before
    assert httpx.get(base + "/healthz").json()["status"] == "ok"
    log_text = server.log()
    assert "Traceback" not in log_text
    assert " ERROR " not in log_text
    if upload_form == "optimized":
        # Generous: streaming 3 MiB should hold a few chunks at most.
        assert stats(base)["rssMib"] - rss_before_mib < 16


@pytest.mark.integration
@pytest.mark.parametrize("upload_form", VARIANTS)
def test_truncated_multipart_body_is_refused(servers, dataset, jpeg, upload_form):
    base = upload_server(servers, upload_form).base_url
    before = state_of(dataset)
    # A whole HTTP body whose multipart stops in the middle of the file.
    body = multipart(file_part(padded(jpeg, 4 * MIB)))[: 3 * MIB]
    headers = {**form_headers(), "Content-Length": str(len(body))}
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    status, answer, _ = raw_post(base, upload_url(), headers, chunks)
    assert status == 400
    assert answer["error"]["code"] == "malformed_multipart"
    assert "closing boundary" in answer["error"]["message"]
    assert temp_files(dataset) == []
    assert state_of(dataset) == before
    assert httpx.get(base + "/healthz").status_code == 200


# -- uploads racing listings ---------------------------------------------------


def listed_count(answer: dict | list) -> int:
    """Images of the patient in an images list or a patient answer, either form."""
    if isinstance(answer, list):
        return len(answer)
    if "pagination" in answer:
        return answer["pagination"]["total"]
    if "imageCount" in answer:
        return answer["imageCount"]
    return len(answer["radiologyImages"])


async def _race(base: str, body: bytes, uploads: int, listings: int):
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def upload() -> httpx.Response:
            return await client.post(upload_url(), content=body, headers=form_headers())

        async def listing(i: int) -> httpx.Response:
            path = upload_url() if i % 2 else f"/api/patients/{PATIENT}"
            return await client.get(path, params={"limit": 100} if i % 2 else None)

        return await asyncio.gather(
            asyncio.gather(*(upload() for _ in range(uploads))),
            asyncio.gather(*(listing(i) for i in range(listings))),
        )


def patient_rows(state_dataset: Path) -> int:
    with sqlite3.connect(database_path(state_dataset)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM radiology_images WHERE patient_id = ?", (PATIENT,)
        ).fetchone()
    conn.close()
    return count


@pytest.mark.integration
@pytest.mark.parametrize("upload_form", VARIANTS)
def test_concurrent_uploads_and_listings_add_up(servers, dataset, jpeg, upload_form):
    base = upload_server(servers, upload_form).base_url
    before = state_of(dataset)
    rows_before = patient_rows(dataset)
    uploads, listings = 12, 12
    data = padded(jpeg, 256 * 1024)
    posted, listed = asyncio.run(
        _race(base, multipart(file_part(data)), uploads, listings)
    )

    statuses = sorted(r.status_code for r in posted)
    created = [r.json() for r in posted if r.status_code == 201]
    # SQLite serializes the writers; one that waits past its busy timeout
    # answers 503 and leaves nothing behind.
    assert set(statuses) <= {201, 503}, [r.text for r in posted]
    assert len(created) >= uploads // 2
    for response in posted:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "database_busy"

    after = state_of(dataset)
    storage = storage_path(dataset)
    new_ids = {image["id"] for image in created}
    assert len(new_ids) == len(created)
    assert after.image_ids == before.image_ids | new_ids
    assert set(after.files) == set(before.files) | {i["fileName"] for i in created}
    for image in created:
        assert image["patientId"] == PATIENT
        assert (storage / image["fileName"]).read_bytes() == data
    assert patient_rows(dataset) == rows_before + len(created)
    assert temp_files(dataset) == []

    for response in listed:
        assert response.status_code == 200, response.text
        assert (
            rows_before <= listed_count(response.json()) <= rows_before + len(created)
        )
    final = httpx.get(base + upload_url(), params={"limit": 100}).json()
    assert listed_count(final) == rows_before + len(created)
    rows = final["data"] if isinstance(final, dict) else final
    assert new_ids <= {row["id"] for row in rows}


# -- a database locked by another writer ---------------------------------------


@pytest.fixture(scope="module", params=VARIANTS)
def locked_client(request, dataset) -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMBENCH_SQLITE_BUSY_TIMEOUT_S", str(BUSY_TIMEOUT_S))
        db_url, storage = dataset_locations(dataset)
        settings = Settings.for_variant(
            request.param, db_url=db_url, storage_dir=storage
        )
        with TestClient(create_app(settings)) as client:
            yield client


def test_locked_database_answers_503_and_leaves_nothing(
    locked_client, dataset, jpeg, caplog
):
    body = multipart(file_part(jpeg))
    before: State = state_of(dataset)
    lock = sqlite3.connect(database_path(dataset), isolation_level=None, timeout=0)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.WARNING, logger="reference_impl"):
            response = locked_client.post(
                upload_url(), content=body, headers=form_headers()
            )
    finally:
        lock.rollback()
        lock.close()
    assert_error(response, 503, "database_busy", "busy")
    assert response.headers["retry-after"] == "1"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert temp_files(dataset) == []
    assert state_of(dataset) == before

    # Once the other writer is done, the same upload goes through.
    retried = locked_client.post(upload_url(), content=body, headers=form_headers())
    assert retried.status_code == 201, retried.text
    assert state_of(dataset).image_ids == before.image_ids | {retried.json()["id"]}
