"""Pattern ``encoding``: the diagnosis route's validation, the three forms'
payloads, what a call leaves behind with the cycle collector off, and the
forms' memory under a concurrent load."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import anyio
import httpx
import pytest
from ai_support import (
    build_clinic,
    bytes_left_behind,
    file_sizes,
    functional_clinic,
    running_stub,
    stub_control,
)
from PIL import Image
from starlette.testclient import TestClient

from benchmarks.serverproc import ServerProcess, free_port, serve_args
from reference_impl import aiclient, imagegen
from reference_impl.app import create_app
from reference_impl.config import Settings
from reference_impl.errors import ApiError
from reference_impl.patterns import encoding
from reference_impl.server import dataset_locations

VARIANTS = ("naive", "optimized", "optimized-plus")
MAX_IMAGES = {"naive": 10, "optimized": 5, "optimized-plus": 5}
ROUTE = "/api/ai/dental-diagnosis"
#: Patient 1 has images 1-12, patient 2 images 13-14, patient 3 none.
OTHER_PATIENTS_IMAGE = 13
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return functional_clinic(tmp_path_factory.mktemp("encoding") / "clinic")


def settings_for(dataset: Path, variant: str, ai_url: str, **kwargs) -> Settings:
    db_url, storage = dataset_locations(dataset)
    return Settings.for_variant(
        variant, db_url=db_url, storage_dir=storage, ai_url=ai_url, **kwargs
    )


def open_clients(stack: ExitStack, dataset: Path, ai_url: str, **kwargs):
    return {
        variant: stack.enter_context(
            TestClient(create_app(settings_for(dataset, variant, ai_url, **kwargs)))
        )
        for variant in VARIANTS
    }


# -- the request body -------------------------------------------------------

BAD_BODIES = [
    ({}, "missing_patient_id", "patientId"),
    ({"patientId": "12"}, "invalid_patient_id", "'12'"),
    ({"patientId": 1.5}, "invalid_patient_id", "1.5"),
    ({"patientId": True}, "invalid_patient_id", "True"),
    ({"patientId": None}, "invalid_patient_id", "null"),
    ({"patientId": 0}, "invalid_patient_id", "at least 1"),
    ({"patientId": 1, "imageIds": "1,2"}, "invalid_image_ids", "string"),
    ({"patientId": 1, "imageIds": []}, "invalid_image_ids", "empty"),
    ({"patientId": 1, "imageIds": [1, "2"]}, "invalid_image_ids", "imageIds[1]"),
    ({"patientId": 1, "imageIds": [1, -2]}, "invalid_image_ids", "imageIds[1]=-2"),
    ({"patientId": 1, "imageIds": [4, 2, 4]}, "duplicate_image_ids", "4"),
    ({"patientId": 1, "imageId": [1]}, "unknown_field", "imageId"),
]


@pytest.mark.parametrize(("body", "code", "named"), BAD_BODIES)
def test_parse_ask_refuses_bad_bodies(body, code, named):
    with pytest.raises(ApiError) as caught:
        encoding.parse_ask(body, 10)
    assert (caught.value.status, caught.value.code) == (400, code)
    assert named in caught.value.message


@pytest.mark.parametrize("cap", [5, 10])
def test_parse_ask_caps_the_image_count(cap):
    ids = list(range(1, cap + 1))
    assert encoding.parse_ask({"patientId": 1, "imageIds": ids}, cap).image_ids == (
        tuple(ids)
    )
    with pytest.raises(ApiError) as caught:
        encoding.parse_ask({"patientId": 1, "imageIds": [*ids, cap + 1]}, cap)
    assert caught.value.code == "too_many_images"
    assert f"{cap + 1} images" in caught.value.message
    assert f"at most {cap}" in caught.value.message


def test_parse_ask_without_image_ids():
    ask = encoding.parse_ask({"patientId": 7}, 5)
    assert (ask.patient_id, ask.image_ids) == (7, None)


# -- the route refuses bad input, in every form ------------------------------


@pytest.fixture(scope="module")
def offline_clients(clinic: Path) -> Iterator[dict[str, TestClient]]:
    """Apps whose AI service is never reached: every request here is refused."""
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    with ExitStack() as stack:
        yield open_clients(stack, clinic, dead_url)


def _too_many(variant: str) -> list[int]:
    return list(range(1, MAX_IMAGES[variant] + 2))


BAD_REQUESTS = [
    # (name, json body or raw bytes, status, code, what the message names)
    ("too_many", _too_many, 400, "too_many_images", "at most"),
    ("unknown_images", {"patientId": 1, "imageIds": [1, 998, 999]}, 404,
     "images_not_found", "998, 999"),
    ("another_patients", {"patientId": 1, "imageIds": [2, OTHER_PATIENTS_IMAGE]},
     400, "images_of_another_patient", f"{OTHER_PATIENTS_IMAGE} do not belong"),
    ("duplicates", {"patientId": 1, "imageIds": [2, 2]}, 400,
     "duplicate_image_ids", "2"),
    ("invalid_json", b'{"patientId": 1,', 400, "invalid_json", "not valid JSON"),
    ("not_an_object", [1, 2], 400, "invalid_body", "list"),
    ("non_numeric_patient", {"patientId": "abc"}, 400, "invalid_patient_id",
     "'abc'"),
    ("unknown_patient", {"patientId": 999}, 404, "not_found", "999"),
    ("huge_patient", {"patientId": 2**70}, 404, "not_found", str(2**70)),
    ("image_ids_wrong_type", {"patientId": 1, "imageIds": {"a": 1}}, 400,
     "invalid_image_ids", "object"),
    ("no_images", {"patientId": 3}, 422, "no_images", "patient 3"),
]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("body", "status", "code", "named"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_named_4xx(
    offline_clients, variant, body, status, code, named
):
    client = offline_clients[variant]
    if callable(body):
        body = {"patientId": 1, "imageIds": body(variant)}
    if isinstance(body, bytes):
        response = client.post(
            ROUTE, content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = client.post(ROUTE, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert named in error["message"]
    assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize("variant", VARIANTS)
def test_too_many_images_names_count_and_cap(offline_clients, variant):
    cap = MAX_IMAGES[variant]
    response = offline_clients[variant].post(
        ROUTE, json={"patientId": 1, "imageIds": list(range(1, cap + 2))}
    )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert f"{cap + 1} images" in message
    assert f"at most {cap} " in message


# -- answers from the model ----------------------------------------------------


def completion_bytes(content: object, model: str = "m") -> bytes:
    return json.dumps(
        {"model": model, "choices": [{"message": {"content": content}}]}
    ).encode()


def test_parse_answer_reads_fenced_json():
    answer = aiclient.parse_answer(
        200, completion_bytes('```json\n{"summary": "ok"}\n```', model="x")
    )
    assert answer == aiclient.ChatAnswer(model="x", content={"summary": "ok"})


@pytest.mark.parametrize(
    ("status", "data", "code", "named"),
    [
        (500, b'{"error": {"message": "overloaded"}}', "ai_error", "overloaded"),
        (429, b"slow down", "ai_error", "429"),
        (200, b"<html>", "ai_bad_response", "not JSON"),
        (200, b'{"choices": []}', "ai_bad_response", "choices[0]"),
        (200, completion_bytes(None), "ai_bad_response", "not a string"),
        (200, completion_bytes("I think"), "ai_bad_response", "'I think'"),
        (200, completion_bytes("[1, 2]"), "ai_bad_response", "not an object"),
    ],
)
def test_parse_answer_names_what_is_wrong(status, data, code, named):
    error = aiclient.parse_answer(status, data)
    assert isinstance(error, ApiError)
    assert (error.status, error.code) == (502, code)
    assert named in error.message


# -- the payloads of the forms -------------------------------------------------


def image_refs(dataset: Path, ids: list[int]) -> tuple[encoding.ImageRef, ...]:
    async def find():
        settings = settings_for(dataset, "optimized", "http://unused/v1")
        app = create_app(settings)
        await app.state.db.start()
        try:
            ask = encoding.DiagnosisAsk(1, tuple(ids))
            return await encoding.find_images(
                app.state.db, settings.storage_dir, ask, 10
            )
        finally:
            await app.state.db.stop()

    return anyio.run(find)


def model_call(images: tuple[encoding.ImageRef, ...]) -> encoding.ModelCall:
    return encoding.ModelCall(
        http=None,  # type: ignore[arg-type]
        url="http://unused/v1/chat/completions",
        model="m",
        deadline_s=1.0,
        patient_id=1,
        images=images,
    )


def streamed(call: encoding.ModelCall) -> bytes:
    async def collect() -> bytes:
        return b"".join([piece async for piece in encoding.streamed_body(call)])

    return anyio.run(collect)


def test_streamed_body_is_the_whole_payload_for_images_that_fit(clinic):
    # Image 2 (and 5) is the periapical, 628 x 820 px: sent unchanged.
    images = image_refs(clinic, [2, 5])
    call = model_call(images)
    whole = call.payload([encoding.read_data_url(image) for image in images])
    assert json.loads(streamed(call)) == whole


def test_streamed_body_shrinks_large_images(clinic):
    images = image_refs(clinic, [3, 1])  # the panoramic and the bitewing
    payload = json.loads(streamed(model_call(images)))
    parts = payload["messages"][1]["content"][1:]
    assert len(parts) == 2
    for part in parts:
        head, _, text = part["image_url"]["url"].partition(",")
        assert head == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(text))) as picture:
            assert max(picture.size) == encoding.MAX_SIDE_PX


def test_shrink_image_keeps_images_that_fit(clinic):
    (image,) = image_refs(clinic, [2])
    assert encoding.shrink_image(image) == (image.mime_type, image.path.read_bytes())


# -- the httpx cycle ---------------------------------------------------------------


def _post_with(send, body) -> int:
    async def run() -> int:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
        async with httpx.AsyncClient(transport=transport) as http:
            status, _ = await send(http, "http://ai.test/v1/chat/completions", body)
            return status

    return anyio.run(run)


def test_httpx_response_keeps_the_request_body_until_gc():
    """The cycle itself: without the collector, json= leaves the payload behind."""

    def payload() -> dict[str, str]:
        return {"image": "A" * (4 * MIB)}

    status, left = bytes_left_behind(lambda: _post_with(aiclient.send_json, payload()))
    assert status == 200
    assert left > 4 * MIB  # the JSON body httpx encoded is still allocated
    status, left = bytes_left_behind(
        lambda: _post_with(aiclient.send_released, aiclient.encode_json(payload()))
    )
    assert status == 200
    assert left < MIB // 4


# -- against the AI stub -------------------------------------------------------------


@pytest.fixture(scope="module")
def ai_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_stub(tmp_path_factory.mktemp("stub")) as url:
        yield url


@pytest.fixture(scope="module")
def clients(clinic: Path, ai_url: str) -> Iterator[dict[str, TestClient]]:
    with ExitStack() as stack:
        yield open_clients(stack, clinic, ai_url, ai_timeout_s=30.0)


@pytest.mark.integration
@pytest.mark.parametrize("variant", VARIANTS)
def test_diagnosis_of_the_most_recent_images(clients, clinic, ai_url, variant):
    cap = MAX_IMAGES[variant]
    response = clients[variant].post(ROUTE, json={"patientId": 1})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected_ids = list(range(12, 12 - cap, -1))
    assert answer["patientId"] == 1
    assert answer["imageIds"] == expected_ids
    assert answer["imagesAnalyzed"] == cap
    assert answer["model"] == encoding.DEFAULT_MODEL
    assert len(answer["diagnosis"]["images"]) == cap
    received = stub_control(ai_url)["last"]
    assert received["imageCount"] == cap
    sizes = file_sizes(clinic)
    if variant == "optimized-plus":
        assert all(max(size) <= encoding.MAX_SIDE_PX for size in received["sizesPx"])
    else:
        assert received["decodedBytes"] == [sizes[i] for i in expected_ids]


@pytest.mark.integration
@pytest.mark.parametrize("variant", VARIANTS)
def test_diagnosis_of_chosen_images_in_their_order(clients, clinic, ai_url, variant):
    chosen = [3, 1, 2]
    response = clients[variant].post(ROUTE, json={"patientId": 1, "imageIds": chosen})
    assert response.status_code == 200, response.text
    assert response.json()["imageIds"] == chosen
    assert response.json()["imagesAnalyzed"] == len(chosen)
    received = stub_control(ai_url)["last"]
    if variant != "optimized-plus":
        sizes = file_sizes(clinic)
        assert received["decodedBytes"] == [sizes[i] for i in chosen]


@pytest.mark.integration
@pytest.mark.parametrize("variant", VARIANTS)
def test_payload_freed_without_the_cycle_collector(clients, ai_url, variant):
    """With gc off, only the naive form leaves its payload allocated."""
    client = clients[variant]

    def diagnose() -> int:
        return client.post(ROUTE, json={"patientId": 1}).status_code

    assert diagnose() == 200  # warm: pools, compiled queries, imports
    status, left = bytes_left_behind(diagnose)
    assert status == 200
    body_bytes = stub_control(ai_url)["last"]["bodyBytes"]
    if variant == "naive":
        assert left > 0.9 * body_bytes
    else:
        assert left < MIB
        assert left < 0.1 * body_bytes


# -- memory under load, each form in its own server process ---------------------------

LOAD_CONCURRENCY = 4
LOAD_ROUNDS = 1


@pytest.fixture(scope="module")
def heavy_clinic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One patient with ten full-size panoramics of ~2 MB (three distinct files)."""
    rng = random.Random(11)
    files = [imagegen.generate("panoramic", rng) for _ in range(3)]
    return build_clinic(tmp_path_factory.mktemp("heavy") / "clinic", [10], files)


def growth_under_load_mib(base_url: str, variant: str) -> float:
    """Peak RSS (the kernel's high-water mark) over the RSS before the load."""
    with httpx.Client(base_url=base_url, timeout=120) as http:
        baseline = http.get("/debug/stats").json()["process"]["rssMib"]

        def diagnose(_: int) -> tuple[int, int]:
            response = http.post(ROUTE, json={"patientId": 1})
            return response.status_code, response.json().get("imagesAnalyzed", 0)

        requests = LOAD_CONCURRENCY * LOAD_ROUNDS
        with concurrent.futures.ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            results = list(pool.map(diagnose, range(requests)))
        assert results == [(200, MAX_IMAGES[variant])] * requests
        peak = http.get("/debug/stats").json()["process"]["hwmMib"]
    return peak - baseline


@pytest.mark.integration
@pytest.mark.slow
def test_memory_growth_orders_the_forms(heavy_clinic, tmp_path):
    growth: dict[str, float] = {}
    with running_stub(tmp_path) as ai_url:
        for variant in VARIANTS:
            port = free_port()
            command = serve_args(
                variant, port=port, dataset=heavy_clinic, ai_url=ai_url
            )
            log_path = tmp_path / f"{variant}.log"
            with ServerProcess(command, port=port, log_path=log_path) as server:
                growth[variant] = growth_under_load_mib(server.base_url, variant)
    print(
        f"peak RSS growth over baseline, {LOAD_ROUNDS} round(s) of"
        f" {LOAD_CONCURRENCY} concurrent diagnoses of ten ~2 MB images (MiB): "
        + ", ".join(f"{variant} {mib:.0f}" for variant, mib in growth.items())
    )
    assert growth["optimized"] < 0.8 * growth["naive"]
    assert growth["optimized-plus"] < 0.5 * growth["optimized"]
