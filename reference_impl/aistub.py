"""Serve a local stand-in for the vision-model API the diagnosis route calls.

``POST /v1/chat/completions`` takes an OpenAI-style chat completion whose
user message holds the images as base64 ``image_url`` data URLs. The stub
checks the payload (JSON with a model and messages, every data URL decodes
to an image whose header Pillow reads, no more images than ``--max-images``,
none larger than ``--max-image-mib``)
and answers 400 with an OpenAI-style error otherwise, or a ``chat.completion``
whose message content is a JSON dental diagnosis: findings per image, teeth,
a summary, and the image count and decoded sizes it received.

``--delay`` and ``--fail-mode`` make it slow or broken on purpose;
``POST /control`` with ``{"delayS": ..., "failMode": ..., "maxImages": ...}``
changes them while it runs, and ``GET /control`` reports them with counters
(requests, in flight, abandoned by the client). Fail modes: ``500`` answers
an error, ``garbage`` answers 200 with a body that is not JSON, ``hang``
never answers (it waits until the client goes away), ``disconnect`` sends
the status line and headers, then closes the connection.

The stub holds one request body at a time per request and decodes one image
at a time, so it stays small beside the server being measured.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reference_impl.errors import UsageError

log = logging.getLogger("reference_impl")

FAIL_MODES = ("none", "500", "garbage", "hang", "disconnect")
DEFAULT_PORT = 8090
DEFAULT_MAX_IMAGES = 10
DEFAULT_MAX_BODY_MIB = 256
#: OpenAI's limit on one image.
DEFAULT_MAX_IMAGE_MIB = 20
#: A hung request gives up by itself after this long, client or not.
HANG_LIMIT_S = 600.0

#: The opening of a JSON string holding a base64 data URL.
DATA_URL_HEAD = re.compile(rb'"data:([^;",]{1,100});base64,')

CONDITIONS = (
    ("caries", "restore the lesion"),
    ("periapical radiolucency", "assess vitality; consider endodontic treatment"),
    ("horizontal bone loss", "periodontal charting and scaling"),
    ("overhanging restoration", "refine or replace the restoration"),
    ("impacted third molar", "surgical consultation"),
    ("calculus", "professional cleaning"),
    ("widened periodontal ligament", "check the occlusion"),
)
SEVERITIES = ("low", "moderate", "high")
FDI_TEETH = tuple(q * 10 + n for q in (1, 2, 3, 4) for n in range(1, 9))


# -- settings and counters --------------------------------------------------


@dataclass
class StubState:
    """What one stub app is told to do, and what it has seen."""

    delay_s: float = 0.0
    fail_mode: str = "none"
    max_images: int = DEFAULT_MAX_IMAGES
    max_body_bytes: int = DEFAULT_MAX_BODY_MIB * 1024 * 1024
    max_image_bytes: int = DEFAULT_MAX_IMAGE_MIB * 1024 * 1024
    requests: int = 0
    in_flight: int = 0
    abandoned: int = 0
    dropped: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    last: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "delayS": self.delay_s,
            "failMode": self.fail_mode,
            "maxImages": self.max_images,
            "requests": self.requests,
            "inFlight": self.in_flight,
            "abandoned": self.abandoned,
            "dropped": self.dropped,
            "byStatus": {str(k): v for k, v in sorted(self.by_status.items())},
            "last": self.last,
        }

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``/control`` changes; ValueError names the bad one."""
        unknown = sorted(set(changes) - {"delayS", "failMode", "maxImages"})
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        delay = changes.get("delayS", self.delay_s)
        mode = changes.get("failMode", self.fail_mode)
        max_images = changes.get("maxImages", self.max_images)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ValueError(f"delayS={delay!r} must be a number of seconds >= 0")
        if mode not in FAIL_MODES:
            raise ValueError(f"failMode={mode!r} is not one of {', '.join(FAIL_MODES)}")
        if isinstance(max_images, bool) or not isinstance(max_images, int):
            raise ValueError(f"maxImages={max_images!r} must be an integer")
        if max_images < 1:
            raise ValueError(f"maxImages={max_images} must be at least 1")
        self.delay_s, self.fail_mode, self.max_images = float(delay), mode, max_images


# -- checking a payload -------------------------------------------------------


class Rejected(Exception):
    """Raised when a payload breaks a rule; the message names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    format: str
    width_px: int
    height_px: int
    decoded_bytes: int


@dataclass(frozen=True)
class Inspection:
    """What a valid payload held."""

    model: str
    images: tuple[ImageInfo, ...]
    body_bytes: int


def _decode_image(n: int, mime_type: str, text: memoryview, escaped: bool) -> ImageInfo:
    from PIL import Image, UnidentifiedImageError

    where = f"image {n}"
    if not mime_type.startswith("image/"):
        raise Rejected(f"{where}: data URL type {mime_type!r} is not image/*", "url")
    raw: bytes | memoryview = text
    if escaped:
        # A JSON encoder may escape "/" as "\/"; nothing else belongs in base64.
        raw = bytes(text).replace(b"\\/", b"/")
        if b"\\" in raw:
            raise Rejected(f"{where}: the base64 text holds JSON escapes", "url")
    try:
        decoded = base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise Rejected(
            f"{where}: the base64 text does not decode ({exc})", "url"
        ) from None
    try:
        with Image.open(io.BytesIO(decoded)) as picture:
            width, height = picture.size
            image_format = picture.format or "unknown"
    except (UnidentifiedImageError, OSError) as exc:
        raise Rejected(
            f"{where}: the decoded bytes are not an image ({exc})", "url"
        ) from None
    return ImageInfo(mime_type, image_format, width, height, len(decoded))


def inspect_payload(
    body: bytes | bytearray, max_images: int, max_image_bytes: int
) -> Inspection:
    """Check a chat-completions body, decoding one image at a time.

    The base64 texts are cut out of the body as they are checked; the JSON
    left (small) is parsed to check its structure.
    """
    view = memoryview(body)
    skeleton: list[bytes] = []
    images: list[ImageInfo] = []
    position = 0
    for match in DATA_URL_HEAD.finditer(body):
        start = match.end()
        end = body.find(b'"', start)
        if end < 0:
            raise Rejected("the body ends inside a data URL")
        if len(images) >= max_images:
            raise Rejected(
                f"more than {max_images} images; this service takes at most"
                f" {max_images}",
                "messages",
            )
        if (end - start) // 4 * 3 > max_image_bytes:
            raise Rejected(
                f"image {len(images) + 1} is over {max_image_bytes} bytes; this"
                " service takes images up to that size",
                "url",
            )
        mime_type = match.group(1).replace(b"\\/", b"/").decode("ascii", "replace")
        escaped = body.find(b"\\", start, end) >= 0
        images.append(
            _decode_image(len(images) + 1, mime_type, view[start:end], escaped)
        )
        skeleton.append(bytes(view[position:start]))
        position = end
    skeleton.append(bytes(view[position:]))
    try:
        document = json.loads(b"".join(skeleton))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected(f"the body is not valid JSON: {exc}") from None
    model = _check_document(document, len(images))
    return Inspection(model, tuple(images), len(body))


def _check_document(document: Any, image_count: int) -> str:
    if not isinstance(document, dict):
        raise Rejected("the body must be a JSON object")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise Rejected("model must be a non-empty string", "model")
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Rejected("messages must be a non-empty array", "messages")
    urls = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "user",
            "assistant",
        ):
            raise Rejected(f"messages[{i}] needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise Rejected(f"messages[{i}].content must be a string or an array")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise Rejected(
                        f"messages[{i}].content[{j}]: only base64 data URLs are"
                        " accepted",
                        "url",
                    )
                urls.append(url)
            elif kind != "text":
                raise Rejected(f"messages[{i}].content[{j}] has type {kind!r}")
    if not urls:
        raise Rejected("the request holds no image_url part", "messages")
    if len(urls) != image_count:
        raise Rejected(
            f"{image_count} data URL(s) in the body but {len(urls)} image_url part(s)"
        )
    return model


# -- answers ------------------------------------------------------------------


def diagnosis(inspection: Inspection) -> dict[str, Any]:
    """A plausible diagnosis, the same for the same image sizes."""
    rng = random.Random(
        ",".join(str(image.decoded_bytes) for image in inspection.images)
    )
    images, teeth, advice = [], {}, []
    for n, image in enumerate(inspection.images, start=1):
        findings = []
        for _ in range(rng.randint(1, 3)):
            condition, recommendation = rng.choice(CONDITIONS)
            tooth = str(rng.choice(FDI_TEETH))
            findings.append(
                {
                    "tooth": tooth,
                    "condition": condition,
                    "severity": rng.choice(SEVERITIES),
                    "confidence": round(rng.uniform(0.55, 0.97), 2),
                }
            )
            teeth[tooth] = condition
            if recommendation not in advice:
                advice.append(recommendation)
        images.append(
            {
                "image": n,
                "format": image.format,
                "widthPx": image.width_px,
                "heightPx": image.height_px,
                "decodedBytes": image.decoded_bytes,
                "findings": findings,
            }
        )
    count = sum(len(image["findings"]) for image in images)
    return {
        "summary": f"{len(images)} image(s) reviewed; {count} finding(s) on"
        f" {len(teeth)} teeth.",
        "imageCount": len(images),
        "images": images,
        "teeth": dict(sorted(teeth.items())),
        "recommendations": advice,
    }


def completion(inspection: Inspection, number: int) -> dict[str, Any]:
    content = json.dumps(diagnosis(inspection))
    prompt_tokens = 85 + 765 * len(inspection.images)
    completion_tokens = len(content) // 4
    return {
        "id": f"chatcmpl-stub-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": inspection.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def openai_error(
    status: int, message: str, kind: str, param: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}},
        status_code=status,
    )


class DroppedOnPurpose(Exception):
    """Raised after the headers went out, so the server closes the connection."""


class DropConnection(Response):
    """Send a status line and headers, then break off the answer."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope, receive, send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"4096"),
                ],
            }
        )
        raise DroppedOnPurpose("the stub's fail mode is 'disconnect'")


def _hide_planned_drops(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, DroppedOnPurpose)


# -- routes ---------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytearray | None:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


async def _wait_for_disconnect(request: Request) -> None:
    # With the body read, the next ASGI message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _client_left_within(request: Request, seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        await _wait_for_disconnect(request)
        return True
    return False


async def chat_completions(request: Request) -> Response:
    state: StubState = request.app.state.stub
    state.requests += 1
    number = state.requests
    state.in_flight += 1
    try:
        response = await _answer(request, state, number)
    finally:
        state.in_flight -= 1
    if not isinstance(response, DropConnection):
        state.by_status[response.status_code] += 1
    return response


async def _answer(request: Request, state: StubState, number: int) -> Response:
    body = await _read_body(request, state.max_body_bytes)
    if body is None:
        return openai_error(
            413,
            f"the body is over {state.max_body_bytes} bytes",
            "invalid_request_error",
        )
    gone = Response(status_code=499)  # nobody is listening any more
    if state.delay_s > 0 and await _client_left_within(request, state.delay_s):
        state.abandoned += 1
        return gone
    mode = state.fail_mode
    if mode == "hang":
        if await _client_left_within(request, HANG_LIMIT_S):
            state.abandoned += 1
        return gone
    if mode == "500":
        return openai_error(500, "the stub was told to fail", "server_error")
    if mode == "garbage":
        return Response(b"<html>upstream hiccup", media_type="text/html")
    if mode == "disconnect":
        state.dropped += 1
        return DropConnection()
    try:
        # Decoding tens of MB of base64 takes a while: a worker thread does it
        # so the loop keeps answering /control and other requests.
        inspection = await anyio.to_thread.run_sync(
            inspect_payload, body, state.max_images, state.max_image_bytes
        )
    except Rejected as exc:
        return openai_error(400, exc.message, "invalid_request_error", exc.param)
    finally:
        del body
    state.last = {
        "imageCount": len(inspection.images),
        "decodedBytes": [image.decoded_bytes for image in inspection.images],
        "sizesPx": [[image.width_px, image.height_px] for image in inspection.images],
        "bodyBytes": inspection.body_bytes,
        "model": inspection.model,
    }
    return JSONResponse(completion(inspection, number))


async def control(request: Request) -> JSONResponse:
    state: StubState = request.app.state.stub
    if request.method == "POST":
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            state.update(changes)
        except ValueError as exc:
            return openai_error(400, str(exc), "invalid_request_error")
        log.info("stub now: delay %s s, fail mode %s", state.delay_s, state.fail_mode)
    return JSONResponse(state.as_json())


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", **request.app.state.stub.as_json()})


def create_stub_app(state: StubState | None = None) -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/control", control, methods=["GET", "POST"]),
            Route("/healthz", health),
        ]
    )
    app.state.stub = state if state is not None else StubState()
    return app


# -- command line ---------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--delay", type=float, default=0.0, metavar="S", help="seconds before answering"
    )
    parser.add_argument("--fail-mode", choices=FAIL_MODES, default="none")
    parser.add_argument(
        "--max-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        metavar="N",
        help=f"most images a request may hold (default {DEFAULT_MAX_IMAGES})",
    )
    parser.add_argument(
        "--max-image-mib",
        type=float,
        default=DEFAULT_MAX_IMAGE_MIB,
        metavar="MIB",
        help=f"largest image a request may hold (default {DEFAULT_MAX_IMAGE_MIB})",
    )
    parser.add_argument(
        "--max-body-mib",
        type=float,
        default=DEFAULT_MAX_BODY_MIB,
        metavar="MIB",
        help=f"largest request body read (default {DEFAULT_MAX_BODY_MIB})",
    )


OPTION_NAMES = {
    "delayS": "--delay",
    "failMode": "--fail-mode",
    "maxImages": "--max-images",
}


def state_from_args(args: argparse.Namespace) -> StubState:
    for option, value in (
        ("--max-body-mib", args.max_body_mib),
        ("--max-image-mib", args.max_image_mib),
    ):
        if value <= 0:
            raise UsageError(f"{option}={value:g} must be greater than 0")
    state = StubState(
        max_body_bytes=int(args.max_body_mib * 1024 * 1024),
        max_image_bytes=int(args.max_image_mib * 1024 * 1024),
    )
    try:
        state.update(
            {
                "delayS": args.delay,
                "failMode": args.fail_mode,
                "maxImages": args.max_images,
            }
        )
    except ValueError as exc:
        message = str(exc)
        for setting, option in OPTION_NAMES.items():
            message = message.replace(setting, option)
        raise UsageError(message) from None
    return state


def main(args: argparse.Namespace) -> int:
    import uvicorn

    app = create_stub_app(state_from_args(args))
    logging.getLogger("uvicorn.error").addFilter(_hide_planned_drops)
    log.info(
        "AI stub at http://%s:%s/v1 (delay %s s, fail mode %s)",
        args.host,
        args.port,
        args.delay,
        args.fail_mode,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    return 0
