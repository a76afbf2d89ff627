"""Pattern ``client``: an engine per module and request against one engine
per process, counted through SQLAlchemy events."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from reference_impl.app import create_app

READ_ROUTES = [
    "/api/patients",
    "/api/patients/1",
    "/api/patients/1/images",
    "/api/invoices",
    "/api/exchange-rate?currency=USD",
]


def login_body(dataset) -> dict:
    return json.loads((dataset / "manifest.json").read_text())["login"]


def drive(client: TestClient, dataset, rounds: int) -> int:
    """Hit every database route ``rounds`` times; the number of requests sent."""
    sent = 0
    for _ in range(rounds):
        for path in READ_ROUTES:
            assert client.get(path).status_code == 200, path
            sent += 1
        assert (
            client.post("/api/auth/login", json=login_body(dataset)).status_code == 200
        )
        sent += 1
    return sent


def test_naive_builds_and_disposes_an_engine_per_request(ci_dataset, make_settings):
    app = create_app(make_settings(ci_dataset, "naive"))
    with TestClient(app) as client:
        sent = drive(client, ci_dataset, rounds=3)
        stats = client.get("/debug/stats").json()["database"]
    assert stats["enginesCreated"] == sent
    assert stats["enginesDisposed"] == sent
    assert stats["connectionsOpened"] >= sent
    assert stats["connectionsOpen"] == 0
    # Every API module makes its own engines, the routes no fix touched too.
    assert set(stats["enginesByModule"]) == {
        "patients",
        "images",
        "invoices",
        "exchange-rate",
        "auth",
    }


def test_optimized_reuses_one_engine_and_its_pool(ci_dataset, make_settings):
    app = create_app(make_settings(ci_dataset, "optimized"))
    with TestClient(app) as client:
        sent = drive(client, ci_dataset, rounds=3)
        stats = client.get("/debug/stats").json()["database"]
    assert sent > 10
    assert stats["enginesCreated"] == 1
    assert stats["enginesDisposed"] == 0
    assert 1 <= stats["connectionsOpened"] <= 5
    assert stats["enginesByModule"] == {"app": 1}


def test_the_shared_engine_is_disposed_at_shutdown(ci_dataset, make_settings):
    app = create_app(make_settings(ci_dataset, "optimized"))
    with TestClient(app) as client:
        client.get("/api/patients")
    stats = app.state.db_stats.as_json()
    assert stats["enginesDisposed"] == 1
    assert stats["connectionsOpen"] == 0


def test_client_can_be_made_naive_alone(ci_dataset, make_settings):
    settings = make_settings(ci_dataset, "optimized", naive=frozenset({"client"}))
    with TestClient(create_app(settings)) as client:
        health = client.get("/healthz").json()
        body = client.get("/api/patients").json()
        stats = client.get("/debug/stats").json()["database"]
    assert health == {
        "status": "ok",
        "variant": "optimized",
        "naivePatterns": ["client"],
        "plusPatterns": [],
    }
    assert "pagination" in body  # listing stays optimized
    assert stats["enginesCreated"] == 1
