"""The AI stub: what it accepts, what it refuses, its fail modes and its
command line."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import pytest
from ai_support import (
    running_stub,
    stub_control,
    stub_root,
    wait_until_idle,
)
from PIL import Image
from starlette.testclient import TestClient

from reference_impl import aistub, cli

COMPLETIONS = "/v1/chat/completions"


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime_type: str = "image/png") -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def chat(*urls: str, model: str = "vision-test") -> dict:
    parts = [{"type": "text", "text": "what do you see?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a dentist."},
            {"role": "user", "content": parts},
        ],
    }


@pytest.fixture
def stub() -> TestClient:
    state = aistub.StubState(max_images=3, max_image_bytes=100_000)
    with TestClient(aistub.create_stub_app(state)) as client:
        yield client


def test_answers_a_chat_completion_with_a_diagnosis(stub):
    images = [png(64, 48), png(30, 90)]
    response = stub.post(COMPLETIONS, json=chat(*map(data_url, images)))
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "vision-test"
    assert completion["usage"]["total_tokens"] > 0
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant"
    diagnosis = json.loads(message["content"])
    assert diagnosis["imageCount"] == 2
    assert [i["decodedBytes"] for i in diagnosis["images"]] == list(map(len, images))
    assert [(i["widthPx"], i["heightPx"]) for i in diagnosis["images"]] == [
        (64, 48),
        (30, 90),
    ]
    assert all(image["findings"] for image in diagnosis["images"])
    assert diagnosis["summary"] and diagnosis["teeth"]
    last = stub.get("/control").json()["last"]
    assert last["decodedBytes"] == list(map(len, images))


def test_same_images_same_diagnosis(stub):
    payload = chat(data_url(png(20, 20)))
    first = stub.post(COMPLETIONS, json=payload).json()["choices"][0]
    second = stub.post(COMPLETIONS, json=payload).json()["choices"][0]
    assert first["message"]["content"] == second["message"]["content"]


def test_accepts_escaped_slashes(stub):
    image = png(300, 200)
    url = data_url(image)
    assert "/" in url.partition(",")[2]
    body = json.dumps(chat(url)).replace("/", "\\/").encode()
    response = stub.post(
        COMPLETIONS, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    diagnosis = json.loads(response.json()["choices"][0]["message"]["content"])
    assert diagnosis["images"][0]["decodedBytes"] == len(image)


GOOD = data_url(png(8, 8))
REFUSED = [
    ("not_json", b'{"model": "m", ', "not valid JSON"),
    ("no_model", {**chat(GOOD), "model": ""}, "model"),
    ("no_messages", {"model": "m", "messages": []}, "messages"),
    ("bad_base64", chat("data:image/png;base64,@@@="), "does not decode"),
    ("not_an_image", chat(data_url(b"hello, world")), "not an image"),
    ("text_url", chat(data_url(b"hi", "text/plain")), "not image/*"),
    ("http_url", chat(GOOD, "https://example.test/x.png"), "data URLs"),
    ("no_images", chat(), "no image_url"),
    ("too_many", chat(GOOD, GOOD, GOOD, GOOD), "at most 3"),
    ("too_large", chat(data_url(bytes(200_000))), "over 100000 bytes"),
    ("bad_role", {"model": "m", "messages": [{"role": "x"}]}, "role"),
]


@pytest.mark.parametrize(
    ("body", "named"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refuses_bad_payloads_openai_style(stub, body, named):
    if isinstance(body, bytes):
        response = stub.post(
            COMPLETIONS, content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = stub.post(COMPLETIONS, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert named in error["message"]
    assert stub.get("/control").json()["byStatus"] == {"400": 1}


def test_control_switches_fail_modes(stub):
    payload = chat(GOOD)
    assert stub.post("/control", json={"failMode": "500"}).json()["failMode"] == "500"
    response = stub.post(COMPLETIONS, json=payload)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    stub.post("/control", json={"failMode": "garbage"})
    response = stub.post(COMPLETIONS, json=payload)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    stub.post("/control", json={"failMode": "none", "maxImages": 1})
    assert stub.post(COMPLETIONS, json=payload).status_code == 200
    assert stub.post(COMPLETIONS, json=chat(GOOD, GOOD)).status_code == 400
    state = stub.get("/control").json()
    assert state["requests"] == 4
    assert state["byStatus"] == {"200": 2, "400": 1, "500": 1}


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"failMode": "boom"}, "failMode='boom'"),
        ({"delayS": -1}, "delayS=-1"),
        ({"delayS": "1"}, "delayS='1'"),
        ({"maxImages": 0}, "maxImages=0"),
        ({"maxImages": 2.5}, "maxImages=2.5"),
        ({"verbose": True}, "verbose"),
    ],
)
def test_control_refuses_bad_settings(stub, changes, named):
    response = stub.post("/control", json=changes)
    assert response.status_code == 400
    assert named in response.json()["error"]["message"]
    assert stub.get("/control").json()["failMode"] == "none"


def test_apps_do_not_share_state():
    with (
        TestClient(aistub.create_stub_app()) as one,
        TestClient(aistub.create_stub_app()) as two,
    ):
        one.post("/control", json={"failMode": "hang"})
        assert two.get("/control").json()["failMode"] == "none"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--delay", "-1"], "--delay=-1"),
        (["--max-images", "0"], "--max-images=0"),
        (["--max-body-mib", "0"], "--max-body-mib=0"),
        (["--max-image-mib", "-1"], "--max-image-mib=-1"),
    ],
)
def test_command_line_mistakes_exit_2(capsys, args, named):
    assert cli.main(["ai-stub", *args]) == 2
    assert named in capsys.readouterr().err


# -- as a process ---------------------------------------------------------------


@pytest.mark.integration
def test_stub_process_modes(tmp_path: Path):
    good = chat(GOOD, GOOD)
    args = ("--fail-mode", "500", "--max-images", "2")
    with (
        running_stub(tmp_path, *args) as ai_url,
        httpx.Client(base_url=stub_root(ai_url), timeout=10) as http,
    ):
        health = http.get("/healthz").json()
        assert (health["failMode"], health["maxImages"]) == ("500", 2)
        assert http.post(COMPLETIONS, json=good).status_code == 500

        stub_control(ai_url, failMode="none")
        assert http.post(COMPLETIONS, json=good).status_code == 200
        assert http.post(COMPLETIONS, json=chat(GOOD, GOOD, GOOD)).status_code == 400

        stub_control(ai_url, failMode="disconnect")
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(COMPLETIONS, json=good)

        stub_control(ai_url, failMode="hang")
        with pytest.raises(httpx.ReadTimeout):
            http.post(COMPLETIONS, json=good, timeout=0.5)
        state = wait_until_idle(ai_url)
        assert state["inFlight"] == 0
        assert (state["abandoned"], state["dropped"]) == (1, 1)

        stub_control(ai_url, failMode="none", delayS=0.2)
        assert http.post(COMPLETIONS, json=good).status_code == 200
        assert http.get("/healthz").json()["status"] == "ok"
