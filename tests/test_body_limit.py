"""Pattern ``body-limit``: JSON request bodies.

The optimized form refuses a body over 1 MiB with 413: from its
Content-Length before reading it, or while a chunked body streams in. The
naive form reads any body whole and answers what the route makes of it.
Both answer malformed and incomplete bodies with a 4xx naming what was wrong.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator

import httpx
import pytest
from starlette.testclient import TestClient
from test_upload import Served, body_chunks, raw_post, server_pool

from reference_impl.app import create_app
from reference_impl.config import Settings
from reference_impl.patterns.body_limit import MAX_JSON_BYTES
from reference_impl.server import dataset_locations, read_manifest

VARIANTS = ("naive", "optimized")
LOGIN = "/api/auth/login"
DIAGNOSIS = "/api/ai/dental-diagnosis"
MIB = 1024 * 1024
JSON_TYPE = {"content-type": "application/json"}


def padded_json(total_bytes: int, **fields: object) -> bytes:
    """A JSON object of exactly ``total_bytes`` bytes: ``fields`` plus padding."""
    shell = json.dumps({**fields, "padding": ""}).encode()
    body = json.dumps({**fields, "padding": "x" * (total_bytes - len(shell))})
    assert len(body) == total_bytes
    return body.encode()


def in_chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """A generator body: httpx sends it chunked, with no Content-Length."""
    yield from body_chunks(body, size)


@pytest.fixture(scope="module", params=VARIANTS)
def client(request, ci_dataset) -> Iterator[TestClient]:
    db_url, storage = dataset_locations(ci_dataset)
    settings = Settings.for_variant(request.param, db_url=db_url, storage_dir=storage)
    with TestClient(create_app(settings)) as c:
        yield c


def is_naive(client: TestClient) -> bool:
    return client.app.state.settings.is_naive("body-limit")


def error_of(response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


# -- malformed bodies ---------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"email": "a@b.c",}',
        b"not json",
        b"",
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"email": ' + b"9" * 5000 + b"}",
    ],
    ids=[
        "unclosed",
        "trailing comma",
        "text",
        "empty",
        "not UTF-8",
        "nested too deep",
        "integer too long",
    ],
)
@pytest.mark.parametrize("route", [LOGIN, DIAGNOSIS])
def test_invalid_json_is_a_400(client, route, body):
    response = client.post(route, content=body, headers=JSON_TYPE)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_json"
    assert "not valid JSON" in error["message"]


def test_a_body_that_is_not_json_typed_is_a_415(client):
    response = client.post(
        LOGIN,
        content=b"email=a@b.c&password=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        ({"password": "secret-1234"}, "missing_field", "'email'"),
        ({"email": "someone@example.org"}, "missing_field", "'password'"),
        ({"email": 42, "password": "secret-1234"}, "invalid_field", "'email'"),
        ({"email": "someone@example.org", "password": ""}, "invalid_field", "'pass"),
        ({"email": "someone@example.org", "password": ["x"]}, "invalid_field", "'p"),
        (["someone@example.org", "secret-1234"], "invalid_body", "list"),
        ("someone@example.org", "invalid_body", "str"),
    ],
    ids=[
        "no email",
        "no password",
        "email not text",
        "empty password",
        "password a list",
        "an array",
        "a string",
    ],
)
def test_login_with_a_wrong_or_missing_field_is_a_400(client, body, code, named):
    response = client.post(LOGIN, json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == code
    assert named in error["message"]


def test_login_with_wrong_credentials_is_a_401(client, ci_dataset):
    email = read_manifest(ci_dataset)["login"]["email"]
    for body in (
        {"email": email, "password": "not-the-password"},
        {"email": "nobody@example.org", "password": "not-the-password"},
    ):
        response = client.post(LOGIN, json=body)
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_credentials"


def test_login_with_the_right_credentials_answers_a_token(client, ci_dataset):
    login = read_manifest(ci_dataset)["login"]
    response = client.post(
        LOGIN, json={"email": login["email"], "password": login["password"]}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["token"]
    assert answer["user"]["email"] == login["email"]


# -- bodies over the limit ----------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_login_body_over_the_limit(client, chunked):
    body = padded_json(2 * MIB, email="someone@example.org")
    content = in_chunks(body) if chunked else body
    response = client.post(LOGIN, content=content, headers=JSON_TYPE)
    if is_naive(client):
        # Read whole, parsed, and found to lack a password.
        assert response.status_code == 400
        assert error_of(response)["code"] == "missing_field"
    else:
        assert response.status_code == 413
        error = error_of(response)
        assert error["code"] == "body_too_large"
        assert str(MAX_JSON_BYTES) in error["message"]
        assert response.headers["connection"] == "close"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_limit_is_exact(client, chunked):
    def send(size: int):
        body = padded_json(size, email="someone@example.org")
        content = in_chunks(body) if chunked else body
        return client.post(LOGIN, content=content, headers=JSON_TYPE)

    at_limit = send(MAX_JSON_BYTES)
    assert at_limit.status_code == 400
    assert error_of(at_limit)["code"] == "missing_field"
    over = send(MAX_JSON_BYTES + 1)
    assert over.status_code == (400 if is_naive(client) else 413)


def test_a_diagnosis_body_over_the_limit(client):
    body = padded_json(2 * MIB, patientId=1)
    response = client.post(DIAGNOSIS, content=in_chunks(body), headers=JSON_TYPE)
    if is_naive(client):
        # Read whole and then judged by the route: never refused for its size.
        assert response.status_code != 413
    else:
        assert response.status_code == 413
        assert error_of(response)["code"] == "body_too_large"


# -- served: refused before it is read ----------------------------------------


@pytest.fixture(scope="module")
def servers(ci_dataset, tmp_path_factory) -> Iterator[Callable[..., Served]]:
    # The login route writes nothing; a copy keeps the shared dataset pristine
    # should a server write its journal beside it.
    copy = tmp_path_factory.mktemp("body-limit") / "dataset"
    shutil.copytree(ci_dataset, copy)
    with server_pool(copy, tmp_path_factory.mktemp("logs")) as get:
        yield get


@pytest.mark.integration
def test_served_optimized_refuses_a_declared_oversize_unread(servers):
    base = servers().base_url
    headers = {**JSON_TYPE, "Content-Length": str(64 * MIB)}
    status, answer, sent = raw_post(base, LOGIN, headers, [])
    assert (status, answer["error"]["code"], sent) == (413, "body_too_large", 0)
    assert str(64 * MIB) in answer["error"]["message"]


@pytest.mark.integration
@pytest.mark.parametrize("naive", [False, True], ids=["optimized", "naive"])
def test_served_chunked_oversize_is_cut_short_only_when_limited(servers, naive):
    base = (servers("body-limit") if naive else servers()).base_url
    body = padded_json(24 * MIB, email="someone@example.org")
    status, answer, sent = raw_post(
        base, LOGIN, JSON_TYPE, body_chunks(body), chunked=True
    )
    if naive:
        assert (status, answer["error"]["code"]) == (400, "missing_field")
        assert sent == len(body)
    else:
        assert (status, answer["error"]["code"]) == (413, "body_too_large")
        # Refused a little past 1 MiB; socket buffers hold a few MiB more.
        assert MAX_JSON_BYTES < sent < 12 * MIB
    assert httpx.get(base + "/healthz").status_code == 200
