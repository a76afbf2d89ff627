"""Pattern ``upload``: ``POST /api/patients/{id}/images`` in both forms.

Every bad input gets its 4xx and a JSON error naming what was wrong, and
leaves the storage folder and the database as they were. Served tests show
what only a real socket shows: the optimized form refuses an oversized body
while it streams, and holds far less memory than the naive form.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import random
import re
import select
import shutil
import socket
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image, features
from starlette.testclient import TestClient

from benchmarks.serverproc import ServerProcess, free_port, serve_args
from reference_impl import imagegen
from reference_impl.app import create_app
from reference_impl.config import Settings
from reference_impl.patterns.upload import (
    MAX_BODY_BYTES,
    MAX_FIELD_BYTES,
    MAX_FILE_BYTES,
)
from reference_impl.serialize import IMAGE_METADATA_FIELDS, camel
from reference_impl.server import dataset_locations, read_manifest

VARIANTS = ("naive", "optimized")
PATIENT = 1
BOUNDARY = "membench-test-boundary"
MIB = 1024 * 1024


# -- building requests -----------------------------------------------------


def part(
    name: str | None,
    data: bytes,
    *,
    filename: str | None = None,
    content_type: str | None = None,
    disposition: str | None = None,
) -> bytes:
    """One multipart part; ``disposition`` replaces the whole header value."""
    if disposition is None:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
    head = f"Content-Disposition: {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data


def multipart(*parts: bytes, boundary: str = BOUNDARY, closed: bool = True) -> bytes:
    """A multipart/form-data body; ``closed=False`` leaves out the final boundary."""
    dash = f"--{boundary}".encode()
    body = b"".join(dash + b"\r\n" + p + b"\r\n" for p in parts)
    return body + dash + b"--\r\n" if closed else body


def form_headers(boundary: str = BOUNDARY) -> dict[str, str]:
    return {"content-type": f"multipart/form-data; boundary={boundary}"}


def file_part(data: bytes, filename: str = "scan.jpg", **kwargs) -> bytes:
    return part("file", data, filename=filename, content_type="image/jpeg", **kwargs)


def upload_url(patient: object = PATIENT) -> str:
    return f"/api/patients/{patient}/images"


def image_bytes(fmt: str, size: tuple[int, int] = (48, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 128).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="session")
def jpeg() -> imagegen.GeneratedImage:
    """A small real radiograph."""
    return imagegen.generate("bitewing", random.Random(7), scale=0.1)


def png_header(width: int, height: int) -> bytes:
    """The signature and IHDR chunk of a PNG of that size: what Pillow reads."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(ihdr))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + crc


def padded(image: bytes, total_bytes: int) -> bytes:
    """A real image followed by zeros up to ``total_bytes``; its header still reads."""
    return image + bytes(total_bytes - len(image))


# -- what a dataset holds ----------------------------------------------------


@dataclass(frozen=True)
class State:
    """Every file of the storage folder (path -> size) and the image rows."""

    files: dict[str, int]
    image_ids: frozenset[int]


def database_path(dataset: Path) -> Path:
    return dataset / read_manifest(dataset)["database"]


def storage_path(dataset: Path) -> Path:
    return dataset_locations(dataset)[1]


def state_of(dataset: Path) -> State:
    storage = storage_path(dataset)
    files = {
        path.relative_to(storage).as_posix(): path.stat().st_size
        for path in storage.rglob("*")
        if path.is_file()
    }
    with sqlite3.connect(database_path(dataset)) as conn:
        ids = frozenset(r[0] for r in conn.execute("SELECT id FROM radiology_images"))
    conn.close()
    return State(files, ids)


def image_row(dataset: Path, image_id: int) -> dict:
    with sqlite3.connect(database_path(dataset)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT * FROM radiology_images WHERE id = ?", (image_id,)
        ).fetchone()
    conn.close()
    return dict(row)


def assert_error(response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    for fragment in fragments:
        assert fragment in error["message"]


# -- in-process: both forms ---------------------------------------------------


@pytest.fixture(scope="module")
def dataset(ci_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One private copy of the ``ci`` dataset for this module.

    Tests compare its state before and after each request, so they may share
    it; a copy per test would cost more than the tests themselves.
    """
    copy = tmp_path_factory.mktemp("upload") / "dataset"
    shutil.copytree(ci_dataset, copy)
    return copy


@pytest.fixture(scope="module", params=VARIANTS)
def client(request, dataset) -> Iterator[TestClient]:
    db_url, storage = dataset_locations(dataset)
    settings = Settings.for_variant(request.param, db_url=db_url, storage_dir=storage)
    with TestClient(create_app(settings)) as c:
        yield c


def test_upload_stores_the_file_and_its_row(client, dataset, jpeg):
    before = state_of(dataset)
    body = multipart(
        file_part(jpeg.data, filename="Panorama 2024 تصویر.jpg"),
        part("kind", b"bitewing"),
        part("description", "molaires inférieures, gauche".encode()),
    )
    response = client.post(upload_url(), content=body, headers=form_headers())
    assert response.status_code == 201, response.text
    image = response.json()
    assert set(image) == {camel(name) for name in IMAGE_METADATA_FIELDS}
    assert image["patientId"] == PATIENT
    assert image["kind"] == "bitewing"
    assert image["description"] == "molaires inférieures, gauche"
    assert image["originalName"] == "Panorama 2024 تصویر.jpg"
    assert image["mimeType"] == "image/jpeg"
    assert image["sizeBytes"] == len(jpeg.data)
    assert (image["widthPx"], image["heightPx"]) == (jpeg.width_px, jpeg.height_px)
    assert re.fullmatch(rf"uploads/{PATIENT}/[0-9a-f]{{32}}\.jpg", image["fileName"])
    stored = storage_path(dataset) / image["fileName"]
    assert stored.read_bytes() == jpeg.data

    after = state_of(dataset)
    assert after.image_ids == before.image_ids | {image["id"]}
    assert after.files == {**before.files, image["fileName"]: len(jpeg.data)}
    row = image_row(dataset, image["id"])
    assert row["file_name"] == image["fileName"]
    assert row["size_bytes"] == len(jpeg.data)
    assert row["analysis"] is None


def test_uploaded_image_is_listed(client, jpeg):
    body = multipart(file_part(jpeg.data))
    new_id = client.post(upload_url(), content=body, headers=form_headers()).json()
    listed = client.get(upload_url() + "?limit=100").json()
    rows = listed["data"] if isinstance(listed, dict) else listed
    assert new_id["id"] in [row["id"] for row in rows]
    count = client.get(f"/api/patients/{PATIENT}").json()
    if "imageCount" in count:
        assert count["imageCount"] == len(rows)


def test_upload_without_kind_is_unspecified(client, jpeg):
    body = multipart(file_part(jpeg.data))
    image = client.post(upload_url(), content=body, headers=form_headers()).json()
    assert image["kind"] == "unspecified"
    assert image["description"] == ""


def test_two_uploads_of_one_name_get_two_files(client, dataset, jpeg):
    body = multipart(file_part(jpeg.data, filename="same.jpg"))
    first = client.post(upload_url(), content=body, headers=form_headers()).json()
    second = client.post(upload_url(), content=body, headers=form_headers()).json()
    assert first["fileName"] != second["fileName"]
    assert first["originalName"] == second["originalName"] == "same.jpg"
    for image in (first, second):
        assert (storage_path(dataset) / image["fileName"]).is_file()


FORMATS = [
    ("PNG", "image/png", "png"),
    ("TIFF", "image/tiff", "tif"),
    ("BMP", "image/bmp", "bmp"),
    pytest.param(
        "WEBP",
        "image/webp",
        "webp",
        marks=pytest.mark.skipif(
            not features.check("webp"), reason="Pillow built without WebP"
        ),
    ),
]


@pytest.mark.parametrize(("fmt", "mime", "ext"), FORMATS)
def test_each_image_format_is_recognized_from_its_bytes(client, fmt, mime, ext):
    # The client's name and type say JPEG; the bytes decide.
    body = multipart(file_part(image_bytes(fmt), filename="label.jpg"))
    response = client.post(upload_url(), content=body, headers=form_headers())
    assert response.status_code == 201, response.text
    image = response.json()
    assert image["mimeType"] == mime
    assert image["fileName"].endswith(f".{ext}")
    assert (image["widthPx"], image["heightPx"]) == (48, 32)


def test_a_file_of_exactly_the_limit_is_accepted(client, dataset, jpeg):
    data = padded(jpeg.data, MAX_FILE_BYTES)
    body = multipart(file_part(data))
    response = client.post(upload_url(), content=body, headers=form_headers())
    assert response.status_code == 201, response.text
    image = response.json()
    assert image["sizeBytes"] == MAX_FILE_BYTES
    assert (storage_path(dataset) / image["fileName"]).stat().st_size == (
        MAX_FILE_BYTES
    )


@dataclass(frozen=True)
class Case:
    """A bad upload: what is sent and the error it must get."""

    name: str
    status: int
    code: str
    body: Callable[[bytes], bytes]
    headers: dict[str, str | None] | None = None
    path: str = upload_url()
    fragments: tuple[str, ...] = ()
    chunked: bool = False


def _no_boundary_type() -> dict[str, str | None]:
    return {"content-type": "multipart/form-data"}


BAD_UPLOADS = [
    Case(
        "file over 10 MiB",
        413,
        "file_too_large",
        lambda img: multipart(file_part(padded(img, MAX_FILE_BYTES + 1))),
        fragments=(str(MAX_FILE_BYTES),),
    ),
    Case(
        "file over 10 MiB, chunked",
        413,
        "file_too_large",
        lambda img: multipart(file_part(padded(img, MAX_FILE_BYTES + 1))),
        fragments=(str(MAX_FILE_BYTES),),
        chunked=True,
    ),
    Case(
        "body far over the limit, chunked",
        413,
        "file_too_large",
        lambda img: multipart(file_part(padded(img, 3 * MAX_BODY_BYTES))),
        chunked=True,
    ),
    Case(
        "text instead of an image",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(b"plain text, not a radiograph\n" * 10)),
        fragments=("JPEG", "PNG"),
    ),
    Case(
        "a few bytes only",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(b"GIF8")),
    ),
    Case(
        "JPEG magic and noise",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(b"\xff\xd8\xff" + bytes(range(256)) * 40)),
        fragments=("JPEG",),
    ),
    Case(
        "PNG signature and noise",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(b"\x89PNG\r\n\x1a\n" + bytes(500))),
        fragments=("PNG",),
    ),
    *(
        Case(
            f"PNG declaring {w} x {h} pixels",
            415,
            "unsupported_media_type",
            lambda img, w=w, h=h: multipart(file_part(png_header(w, h) + bytes(64))),
            fragments=("PNG",),
        )
        for w, h in ((20_000, 5_000), (100_000, 100_000), (0, 10))
    ),
    Case(
        "GIF",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(image_bytes("GIF"))),
    ),
    Case(
        "empty file",
        400,
        "empty_file",
        lambda img: multipart(file_part(b"")),
        fragments=("'file'",),
    ),
    Case(
        "no file field",
        400,
        "missing_file",
        lambda img: multipart(part("kind", b"panoramic")),
        fragments=("'file'",),
    ),
    Case(
        "file under another name",
        400,
        "missing_file",
        lambda img: multipart(part("image", img, filename="scan.jpg")),
    ),
    Case(
        "no parts at all",
        400,
        "malformed_multipart",
        lambda img: b"",
    ),
    Case(
        "two files",
        400,
        "duplicate_file",
        lambda img: multipart(file_part(img), file_part(img)),
    ),
    Case(
        "missing closing boundary",
        400,
        "malformed_multipart",
        lambda img: multipart(file_part(img), closed=False),
        fragments=("closing boundary",),
    ),
    Case(
        "cut in the middle of the file",
        400,
        "malformed_multipart",
        lambda img: multipart(file_part(img))[: len(img) // 2],
    ),
    Case(
        "not multipart at all",
        400,
        "malformed_multipart",
        lambda img: b"this is not a multipart body\r\n" * 4,
    ),
    Case(
        "boundary differs from the header's",
        400,
        "malformed_multipart",
        lambda img: multipart(file_part(img), boundary="another-boundary"),
    ),
    Case(
        "part without Content-Disposition",
        400,
        "malformed_multipart",
        lambda img: (
            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\n".encode()
            + img
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        ),
        fragments=("Content-Disposition",),
    ),
    Case(
        "part not form-data",
        400,
        "malformed_multipart",
        lambda img: multipart(part(None, img, disposition='attachment; name="file"')),
    ),
    Case(
        "header line without a colon",
        400,
        "malformed_multipart",
        lambda img: (
            f"--{BOUNDARY}\r\nno colon here\r\n\r\n".encode()
            + img
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        ),
    ),
    Case(
        "too many part headers",
        400,
        "malformed_multipart",
        lambda img: (
            f"--{BOUNDARY}\r\n".encode()
            + b"".join(b"X-Extra-%d: x\r\n" % i for i in range(40))
            + b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            + img
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        ),
    ),
    Case(
        "part header of 64 KiB",
        400,
        "malformed_multipart",
        lambda img: multipart(
            file_part(img, disposition='form-data; name="file"; x="' + "y" * 65536)
        ),
    ),
    Case(
        "boundary of 300 characters",
        400,
        "malformed_multipart",
        lambda img: multipart(file_part(img), boundary="b" * 300),
        headers={"content-type": "multipart/form-data; boundary=" + "b" * 300},
    ),
    Case(
        "Content-Type without a boundary",
        400,
        "malformed_multipart",
        lambda img: multipart(file_part(img)),
        headers=_no_boundary_type(),
        fragments=("boundary",),
    ),
    Case(
        "JSON instead of a form",
        415,
        "unsupported_media_type",
        lambda img: json.dumps({"file": "aGVsbG8="}).encode(),
        headers={"content-type": "application/json"},
        fragments=("multipart/form-data", "application/json"),
    ),
    Case(
        "raw image bytes",
        415,
        "unsupported_media_type",
        lambda img: img,
        headers={"content-type": "image/jpeg"},
    ),
    Case(
        "url-encoded form",
        415,
        "unsupported_media_type",
        lambda img: b"file=scan.jpg",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    Case(
        "multipart/mixed",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(img)),
        headers={"content-type": f"multipart/mixed; boundary={BOUNDARY}"},
    ),
    Case(
        "no Content-Type",
        415,
        "unsupported_media_type",
        lambda img: multipart(file_part(img)),
        headers={"content-type": None},
        fragments=("none",),
    ),
    *(
        Case(
            f"file name {name!r}",
            400,
            "invalid_file_name",
            lambda img, name=name: multipart(
                file_part(img, filename=name.replace("\\", "\\\\"))
            ),
            fragments=("file name",),
        )
        for name in (
            "../x.jpg",
            "a/b.jpg",
            "C:\\x.jpg",
            "..\\..\\x.jpg",
            "/etc/passwd",
            "..",
            "x\x01.jpg",
        )
    ),
    Case(
        "file name too long",
        400,
        "invalid_file_name",
        lambda img: multipart(file_part(img, filename="x" * 300 + ".jpg")),
        fragments=("255",),
    ),
    Case(
        "unknown kind",
        400,
        "invalid_kind",
        lambda img: multipart(file_part(img), part("kind", b"selfie")),
        fragments=("selfie", "panoramic"),
    ),
    Case(
        "two kinds",
        400,
        "duplicate_field",
        lambda img: multipart(
            file_part(img), part("kind", b"panoramic"), part("kind", b"bitewing")
        ),
    ),
    Case(
        "description too long",
        413,
        "field_too_large",
        lambda img: multipart(
            file_part(img), part("description", b"x" * (MAX_FIELD_BYTES + 1))
        ),
        fragments=("description", str(MAX_FIELD_BYTES)),
    ),
    Case(
        "description not UTF-8",
        400,
        "invalid_field",
        lambda img: multipart(file_part(img), part("description", b"\xff\xfe\xfa")),
        fragments=("description",),
    ),
    Case(
        "unknown patient",
        404,
        "not_found",
        lambda img: multipart(file_part(img)),
        path=upload_url(999_999),
        fragments=("999999",),
    ),
    Case(
        "id beyond any row",
        404,
        "not_found",
        lambda img: multipart(file_part(img)),
        path=upload_url(10**30),
    ),
    *(
        Case(
            f"patient id {raw!r}",
            400,
            "invalid_id",
            lambda img: multipart(file_part(img)),
            path=upload_url(raw),
            fragments=(raw,),
        )
        for raw in ("abc", "0", "-1", "1.5", "1e3")
    ),
]


def send_case(client: TestClient | httpx.Client, case: Case, image: bytes):
    """Send a case's request; a header whose value is None is left out."""
    headers = {**form_headers(), **(case.headers or {})}
    body = case.body(image)
    # A generator has no length: the client sends it chunked.
    content = body_chunks(body) if case.chunked else body
    request = client.build_request(
        "POST",
        case.path,
        content=content,
        headers={k: v for k, v in headers.items() if v is not None},
    )
    assert ("content-length" in request.headers) is not case.chunked
    assert ("content-type" in request.headers) is (headers["content-type"] is not None)
    return client.send(request)


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=lambda case: case.name)
def test_bad_upload_is_refused_and_leaves_nothing(client, dataset, jpeg, case):
    before = state_of(dataset)
    response = send_case(client, case, jpeg.data)
    assert_error(response, case.status, case.code, *case.fragments)
    assert state_of(dataset) == before
    assert client.get("/healthz").status_code == 200
    # The same app still takes a good upload afterwards.
    good = client.post(
        upload_url(), content=multipart(file_part(jpeg.data)), headers=form_headers()
    )
    assert good.status_code == 201


def test_oversized_answer_closes_the_connection(client, jpeg):
    case = BAD_UPLOADS[0]
    response = send_case(client, case, jpeg.data)
    assert response.status_code == 413
    assert response.headers["connection"] == "close"


# -- served: what only a real socket shows ------------------------------------


def raw_post(
    base_url: str,
    path: str,
    headers: dict[str, str],
    chunks: Iterable[bytes],
    *,
    chunked: bool = False,
    timeout_s: float = 30.0,
) -> tuple[int, dict, int]:
    """POST over a plain socket, sending ``chunks`` until the server answers.

    Returns the status, the JSON answer and how many body bytes were sent
    before the answer came (or the server stopped reading).
    """
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=timeout_s)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is here
            frame = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), sent
    finally:
        sock.close()


def body_chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def stats(base_url: str) -> dict:
    return httpx.get(base_url + "/debug/stats").json()["process"]


@dataclass(frozen=True)
class Served:
    """A running ``membench serve`` process and its log."""

    base_url: str
    log_path: Path
    pid: int

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def served(dataset: Path, log_dir: Path, naive: tuple[str, ...]) -> Iterator[Served]:
    """``membench serve --variant optimized --naive NAIVE``."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = serve_args("optimized", port=port, naive=naive, dataset=dataset)
    with ServerProcess(command, port=port, log_path=log_path) as server:
        yield Served(server.base_url, log_path, server.pid)


@contextmanager
def server_pool(dataset: Path, log_dir: Path) -> Iterator[Callable[..., Served]]:
    """``get(*naive_patterns)``: an optimized server with those patterns naive,
    started on first use and stopped at the end."""
    started: dict[tuple[str, ...], Served] = {}
    with ExitStack() as stack:

        def get(*naive: str) -> Served:
            if naive not in started:
                started[naive] = stack.enter_context(served(dataset, log_dir, naive))
            return started[naive]

        yield get


def upload_server(servers: Callable[..., Served], upload_form: str) -> Served:
    """The served build whose upload pattern is ``upload_form`` and no other naive."""
    return servers("upload") if upload_form == "naive" else servers()


@pytest.fixture(scope="module")
def servers(dataset, tmp_path_factory) -> Iterator[Callable[..., Served]]:
    with server_pool(dataset, tmp_path_factory.mktemp("logs")) as get:
        yield get


@pytest.mark.integration
def test_served_optimized_refuses_a_declared_oversize_before_reading(servers):
    base = servers().base_url
    headers = {**form_headers(), "Content-Length": str(64 * MIB)}
    # Not one byte of the body is sent: the answer comes from the headers.
    status, answer, sent = raw_post(base, upload_url(), headers, [])
    assert status == 413
    assert answer["error"]["code"] == "file_too_large"
    assert str(64 * MIB) in answer["error"]["message"]
    assert sent == 0


@pytest.mark.integration
@pytest.mark.parametrize("upload_form", VARIANTS)
def test_served_chunked_oversize_is_cut_short_only_when_streamed(
    servers, dataset, jpeg, upload_form
):
    base = upload_server(servers, upload_form).base_url
    before = state_of(dataset)
    body = multipart(file_part(padded(jpeg.data, 40 * MIB)))
    status, answer, sent = raw_post(
        base, upload_url(), form_headers(), body_chunks(body), chunked=True
    )
    assert status == 413
    assert answer["error"]["code"] == "file_too_large"
    if upload_form == "optimized":
        # Refused a little past 10 MiB; socket buffers hold a few MiB more.
        assert MAX_FILE_BYTES < sent < 24 * MIB
    else:
        assert sent == len(body)
    assert state_of(dataset) == before
    assert httpx.get(base + "/healthz").status_code == 200


@pytest.mark.integration
def test_served_optimized_answers_every_bad_upload(servers, dataset, jpeg):
    base = servers().base_url
    with httpx.Client(base_url=base, timeout=30) as client:
        for case in BAD_UPLOADS:
            before = state_of(dataset)
            response = send_case(client, case, jpeg.data)
            assert_error(response, case.status, case.code, *case.fragments)
            assert state_of(dataset) == before, case.name
        assert client.get("/healthz").json()["status"] == "ok"
        good = client.post(
            upload_url(),
            content=multipart(file_part(jpeg.data)),
            headers=form_headers(),
        )
        assert good.status_code == 201


def _peak_growth_mib(server: Served, uploads: int, data: bytes) -> float:
    """How far the server's peak RSS rose above its RSS while ``uploads``
    uploads of ``data`` ran at once."""
    body = multipart(file_part(data))
    # Memory freed by earlier requests goes back to the kernel first, or the
    # uploads could reuse it unseen; then writing 5 to clear_refs resets
    # VmHWM to the current RSS, so neither the start-up peak nor an earlier
    # test counts.
    httpx.post(server.base_url + "/debug/release").raise_for_status()
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")
    baseline = stats(server.base_url)["rssMib"]

    def post(_: int) -> int:
        response = httpx.post(
            server.base_url + upload_url(),
            content=body,
            headers=form_headers(),
            timeout=60,
        )
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
        statuses = list(pool.map(post, range(uploads)))
    assert statuses == [201] * uploads
    return stats(server.base_url)["hwmMib"] - baseline


@pytest.mark.integration
def test_streamed_uploads_peak_far_below_buffered_ones(servers, jpeg):
    # The server reads an image's header only, so a radiograph padded to
    # 8 MiB weighs on it as a real 8 MiB one would.
    data = padded(jpeg.data, 8 * MIB)
    uploads = 6
    naive_growth = _peak_growth_mib(servers("upload"), uploads, data)
    optimized_growth = _peak_growth_mib(servers(), uploads, data)
    # Naive holds each body and a copy of its file, ~16 MiB an upload while
    # the uploads overlap; at the very least one body and its copy.
    assert naive_growth > 12
    # The streamed form holds a few chunks an upload.
    assert optimized_growth < naive_growth / 3
