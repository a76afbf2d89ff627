"""``membench serve`` as a real process on a free loopback port."""

from __future__ import annotations

import httpx
import pytest

from reference_impl.config import PATTERNS

pytestmark = pytest.mark.integration

GET_ROUTES = [
    "/api/patients",
    "/api/patients/2",
    "/api/patients/2/images",
    "/api/invoices",
    "/api/exchange-rate?currency=EUR",
]


@pytest.mark.parametrize("variant", ["naive", "optimized"])
def test_every_read_route_answers_over_http(serve_app, ci_dataset, variant):
    base = serve_app(variant, dataset=ci_dataset)
    with httpx.Client(base_url=base) as client:
        health = client.get("/healthz").json()
        assert health["variant"] == variant
        expected = list(PATTERNS) if variant == "naive" else []
        assert health["naivePatterns"] == expected
        for path in GET_ROUTES:
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_each_pattern_can_be_made_naive_alone(serve_app, ci_dataset, pattern):
    base = serve_app("optimized", dataset=ci_dataset, naive=[pattern])
    health = httpx.get(base + "/healthz").json()
    assert health == {
        "status": "ok",
        "variant": "optimized",
        "naivePatterns": [pattern],
        "plusPatterns": [],
    }
    listing = httpx.get(base + "/api/patients").json()
    assert isinstance(listing, list) == (pattern == "listing")
