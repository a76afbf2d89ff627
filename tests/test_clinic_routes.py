"""Invoices, exchange rates and login: the routes no fix touched."""

from __future__ import annotations

import json
import threading

import pytest
from starlette.testclient import TestClient

from reference_impl import clinic
from reference_impl.app import create_app
from reference_impl.security import verify_password


@pytest.fixture(scope="module", params=["naive", "optimized"])
def client(request, ci_dataset):
    from reference_impl.config import Settings
    from reference_impl.server import dataset_locations

    db_url, storage = dataset_locations(ci_dataset)
    settings = Settings.for_variant(request.param, db_url=db_url, storage_dir=storage)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def manifest(ci_dataset) -> dict:
    return json.loads((ci_dataset / "manifest.json").read_text())


def test_invoices_are_paginated_with_items(client, manifest):
    body = client.get("/api/invoices?limit=5").json()
    assert len(body["data"]) == 5
    assert body["pagination"]["total"] == manifest["counts"]["invoices"]
    for invoice in body["data"]:
        assert invoice["items"]
        total = sum(i["quantity"] * i["unitPrice"] for i in invoice["items"])
        assert invoice["total"] == pytest.approx(total, abs=0.01)


def test_invoice_pages_do_not_overlap(client):
    first = client.get("/api/invoices?limit=3&page=1").json()["data"]
    second = client.get("/api/invoices?limit=3&page=2").json()["data"]
    assert {i["id"] for i in first}.isdisjoint(i["id"] for i in second)


def test_invoices_reject_a_bad_limit(client):
    response = client.get("/api/invoices?limit=abc")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_limit"


def test_exchange_rate_is_the_latest(client):
    body = client.get("/api/exchange-rate?currency=usd").json()
    assert body["currency"] == "USD"
    assert body["rate"] > 0
    assert body["fetchedAt"]


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("", 400, "missing_currency"),
        ("?currency=", 400, "missing_currency"),
        ("?currency=US", 400, "invalid_currency"),
        ("?currency=U$D", 400, "invalid_currency"),
        ("?currency=XYZ", 404, "not_found"),
    ],
)
def test_exchange_rate_bad_input(client, query, status, code):
    response = client.get(f"/api/exchange-rate{query}")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_login_answers_a_token(client, manifest):
    response = client.post("/api/auth/login", json=manifest["login"])
    assert response.status_code == 200
    body = response.json()
    assert body["token"].count(".") == 2
    assert body["user"]["email"] == manifest["login"]["email"]
    assert "passwordHash" not in body["user"]


def test_login_checks_passwords_on_one_thread(client, manifest, monkeypatch):
    """Every scrypt call runs on the app's one password thread, whose malloc
    arena alone then holds the 16 MiB buffers, not on anyio's worker pool."""
    threads = []

    def verify_and_note(password: str, stored: str) -> bool:
        threads.append(threading.current_thread().name)
        return verify_password(password, stored)

    monkeypatch.setattr(clinic, "verify_password", verify_and_note)
    wrong = {**manifest["login"], "password": "not-the-password"}
    for body in (manifest["login"], wrong, manifest["login"]):
        client.post("/api/auth/login", json=body)
    assert len(threads) == 3
    assert len(set(threads)) == 1
    assert threads[0].startswith("password-hash")


@pytest.mark.parametrize("change", ["password", "email"])
def test_login_refuses_wrong_credentials(client, manifest, change):
    body = dict(manifest["login"])
    body[change] = "wrong-" + body[change]
    response = client.post("/api/auth/login", json=body)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_credentials"


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        ({"password": "x"}, "missing_field", "email"),
        ({"email": "a@b.c"}, "missing_field", "password"),
        ({"email": 5, "password": "x"}, "invalid_field", "email"),
        ({"email": "a@b.c", "password": ""}, "invalid_field", "password"),
        (["a@b.c", "x"], "invalid_body", "object"),
    ],
)
def test_login_bad_fields(client, body, code, named):
    response = client.post("/api/auth/login", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert named in error["message"]


def test_login_invalid_json(client):
    response = client.post(
        "/api/auth/login",
        content=b'{"email": "a@b.c", "password":',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_login_wrong_content_type(client, manifest):
    response = client.post("/api/auth/login", data=manifest["login"])
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
