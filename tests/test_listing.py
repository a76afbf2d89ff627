"""Patterns ``listing`` and ``images``: the optimized pages hold exactly what
the naive full lists hold, in the same order."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from reference_impl.app import create_app
from reference_impl.serialize import IMAGE_METADATA_FIELDS, camel


@pytest.fixture(scope="module")
def clients(ci_dataset, request):
    from reference_impl.config import Settings
    from reference_impl.server import dataset_locations

    db_url, storage = dataset_locations(ci_dataset)
    apps = {
        variant: create_app(
            Settings.for_variant(variant, db_url=db_url, storage_dir=storage)
        )
        for variant in ("naive", "optimized")
    }
    with TestClient(apps["naive"]) as naive, TestClient(apps["optimized"]) as opt:
        yield naive, opt


def all_pages(client: TestClient, url: str, limit: int) -> list[list[dict]]:
    pages, page = [], 1
    while True:
        body = client.get(url, params={"page": page, "limit": limit}).json()
        assert body["pagination"]["page"] == page
        assert body["pagination"]["limit"] == limit
        if not body["data"]:
            assert page == body["pagination"]["totalPages"] + 1
            return pages
        pages.append(body["data"])
        page += 1


def strip_images(patient: dict) -> dict:
    return {k: v for k, v in patient.items() if k != "radiologyImages"}


@pytest.mark.parametrize("limit", [1, 7, 20, 100])
def test_patient_pages_are_slices_of_the_naive_list(clients, limit):
    naive, optimized = clients
    full = naive.get("/api/patients").json()
    assert isinstance(full, list) and len(full) > 1
    pages = all_pages(optimized, "/api/patients", limit)
    for k, page in enumerate(pages):
        expected = full[k * limit : (k + 1) * limit]
        assert [p["id"] for p in page] == [p["id"] for p in expected]
        for got, want in zip(page, expected, strict=True):
            assert got["imageCount"] == len(want["radiologyImages"])
            assert {k: v for k, v in got.items() if k != "imageCount"} == strip_images(
                want
            )
    assert sum(len(p) for p in pages) == len(full)


def test_pagination_totals(clients):
    naive, optimized = clients
    total = len(naive.get("/api/patients").json())
    body = optimized.get("/api/patients").json()
    assert body["pagination"] == {
        "page": 1,
        "limit": 20,
        "total": total,
        "totalPages": -(-total // 20),
    }
    assert len(body["data"]) == min(20, total)


def test_optimized_listing_holds_no_image_rows(clients):
    _, optimized = clients
    for patient in optimized.get("/api/patients").json()["data"]:
        assert "radiologyImages" not in patient
        assert isinstance(patient["imageCount"], int)


def test_patient_detail_matches(clients):
    naive, optimized = clients
    for patient_id in (1, 2, 5):
        full = naive.get(f"/api/patients/{patient_id}").json()
        summary = optimized.get(f"/api/patients/{patient_id}").json()
        assert summary["imageCount"] == len(full["radiologyImages"])
        assert {k: v for k, v in summary.items() if k != "imageCount"} == strip_images(
            full
        )
        # The naive detail carries each image's analysis document.
        assert all(image["analysis"] for image in full["radiologyImages"])


@pytest.mark.parametrize("limit", [1, 3, 20])
def test_image_pages_match_the_naive_list(clients, limit):
    naive, optimized = clients
    metadata = [camel(name) for name in IMAGE_METADATA_FIELDS]
    for patient_id in (1, 3):
        url = f"/api/patients/{patient_id}/images"
        full = naive.get(url).json()
        assert full and all("analysis" in image for image in full)
        pages = all_pages(optimized, url, limit)
        flat = [image for page in pages for image in page]
        assert flat == [{k: image[k] for k in metadata} for image in full]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("page=abc", "invalid_page"),
        ("page=0", "invalid_page"),
        ("page=-1", "invalid_page"),
        ("page=1.5", "invalid_page"),
        ("page=", "invalid_page"),
        ("limit=0", "invalid_limit"),
        ("limit=-5", "invalid_limit"),
        ("limit=101", "invalid_limit"),
        ("limit=1e3", "invalid_limit"),
        ("page=99999999999999999999999", "invalid_page"),
    ],
)
@pytest.mark.parametrize("path", ["/api/patients", "/api/patients/1/images"])
def test_bad_pagination_is_a_400_naming_the_parameter(clients, path, query, code):
    _, optimized = clients
    response = optimized.get(f"{path}?{query}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert code.removeprefix("invalid_") in error["message"]


def test_limit_over_maximum_names_the_rule(clients):
    _, optimized = clients
    error = optimized.get("/api/patients?limit=500").json()["error"]
    assert error["message"] == "limit=500 exceeds the maximum of 100"


def test_page_past_the_end_is_empty(clients):
    _, optimized = clients
    body = optimized.get("/api/patients?page=1000").json()
    assert body["data"] == []
    assert body["pagination"]["page"] == 1000


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/patients/999999", 404, "not_found"),
        ("/api/patients/abc", 400, "invalid_id"),
        ("/api/patients/-3", 400, "invalid_id"),
        ("/api/patients/0", 400, "invalid_id"),
        ("/api/patients/1.0", 400, "invalid_id"),
        ("/api/patients/99999999999999999999999", 404, "not_found"),
        ("/api/patients/999999/images", 404, "not_found"),
        ("/api/patients/x/images", 400, "invalid_id"),
    ],
)
def test_bad_ids(clients, variant, path, status, code):
    response = clients[variant].get(path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_unknown_route_is_a_json_404(clients):
    response = clients[1].get("/api/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_is_a_json_405(clients):
    response = clients[1].delete("/api/patients")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
