"""Pattern ``encoding``: ``POST /api/ai/dental-diagnosis``.

The route sends a patient's radiographs to a vision model as base64 data
URLs in one OpenAI-style chat-completions request, and answers with the
diagnosis the model wrote. Every form shares the validation, the database
lookup, the prompt, the parsing of the answer and the mapping of AI failures
to 502/504; they differ only in how the images become the request body:

- naive: up to 10 images, read and encoded all at once (``asyncio.gather``),
  the whole JSON payload built and posted with httpx's ``json=``.
- optimized: at most 5 images, read and encoded one after another, each
  file's bytes released before the next is read; the payload is still
  built whole.
- optimized-plus: at most 5 images, each shrunk to at most 1024 px on its
  longer side and re-encoded as JPEG when its turn comes, written straight
  into a streamed (chunked) request body, so neither a whole payload nor a
  full-size image is ever held. The model then sees smaller images, and the
  AI service must accept a chunked body, as OpenAI's does.

What kept payloads alive: an httpx response is always in a reference cycle
(its stream, a ``BoundAsyncStream``, points back at it), and it holds its
request, whose content is the whole encoded payload. Once the handler drops
the response, tens of MB stay resident until the cycle collector runs. The
naive form posts as most code does and keeps that behaviour. The optimized
forms go through ``aiclient.send_released``, which closes the response and
replaces its stream, and get AI failures back as values rather than raised
errors whose tracebacks would hold the payload: with the collector disabled,
their payloads are freed as soon as the request ends (see
``tests/test_encoding.py``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import anyio
import httpx
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse

from reference_impl import aiclient
from reference_impl.aiclient import ChatAnswer
from reference_impl.errors import ApiError, bad_request, not_found
from reference_impl.models import Patient, RadiologyImage
from reference_impl.params import MAX_ID
from reference_impl.patterns.body_limit import require_object

log = logging.getLogger("reference_impl")

MODULE = "dental-diagnosis"

#: Images per diagnosis: the original's limit before and after its fix.
NAIVE_MAX_IMAGES = 10
OPTIMIZED_MAX_IMAGES = 5

#: optimized-plus shrinks images to at most this many pixels on a side.
MAX_SIDE_PX = 1024
JPEG_QUALITY = 85
#: Source bytes base64-encoded per piece of a streamed body (a multiple of 3,
#: so the pieces join into one valid base64 text).
B64_CHUNK_BYTES = 3 * 64 * 1024

DEFAULT_MODEL = "gpt-4o"
MAX_ANSWER_TOKENS = 1500

SYSTEM_PROMPT = (
    "You are a dental radiology assistant. Examine the radiographs and answer"
    " with one JSON object with these keys: summary (a string), findings (a"
    " list of objects with image, tooth, condition, severity and confidence),"
    " teeth (an object mapping FDI tooth numbers to their condition) and"
    " recommendations (a list of strings). Number the images from 1 in the"
    " order given; severity is low, moderate or high; confidence is 0 to 1."
)

BODY_FIELDS = ("patientId", "imageIds")
JSON_TYPE_NAMES = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


# -- what was asked --------------------------------------------------------


@dataclass(frozen=True)
class DiagnosisAsk:
    """A validated request body: a patient and, optionally, which images."""

    patient_id: int
    image_ids: tuple[int, ...] | None


def _json_type(value: Any) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _id_value(value: Any, name: str, code: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(
            code, f"{name}={value!r} must be an integer, not a {_json_type(value)}"
        )
    if value < 1:
        raise bad_request(code, f"{name}={value} must be at least 1")
    return value


def parse_ask(body: dict[str, Any], max_images: int) -> DiagnosisAsk:
    """Check the body's fields and types, and the image count against the cap."""
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        raise bad_request(
            "unknown_field",
            f"unknown field(s) {', '.join(unknown)}; the body takes patientId"
            " and, optionally, imageIds",
        )
    if "patientId" not in body:
        raise bad_request("missing_patient_id", "the field patientId is required")
    patient_id = _id_value(body["patientId"], "patientId", "invalid_patient_id")
    raw_ids = body.get("imageIds")
    if raw_ids is None:
        return DiagnosisAsk(patient_id, None)
    if not isinstance(raw_ids, list):
        raise bad_request(
            "invalid_image_ids",
            f"imageIds must be an array of integers, not a {_json_type(raw_ids)}",
        )
    if not raw_ids:
        raise bad_request(
            "invalid_image_ids",
            "imageIds is empty; leave it out to analyse the most recent images",
        )
    if len(raw_ids) > max_images:
        raise bad_request(
            "too_many_images",
            f"imageIds names {len(raw_ids)} images; at most {max_images} are"
            " analysed per diagnosis",
        )
    ids = tuple(
        _id_value(value, f"imageIds[{i}]", "invalid_image_ids")
        for i, value in enumerate(raw_ids)
    )
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise bad_request(
            "duplicate_image_ids",
            f"imageIds names image(s) {_id_list(repeated)} more than once",
        )
    return DiagnosisAsk(patient_id, ids)


def _id_list(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids)


# -- which images -----------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """One image to send: its row's facts and where its file is."""

    id: int
    kind: str
    taken_at: dt.datetime
    mime_type: str
    path: Path


IMAGE_COLUMNS = (
    RadiologyImage.id,
    RadiologyImage.patient_id,
    RadiologyImage.kind,
    RadiologyImage.taken_at,
    RadiologyImage.mime_type,
    RadiologyImage.file_name,
)


async def find_images(
    db, storage: Path, ask: DiagnosisAsk, max_images: int
) -> tuple[ImageRef, ...]:
    """The asked images in the asked order, or the most recent ones."""
    if ask.patient_id > MAX_ID:
        raise not_found(f"patient {ask.patient_id} does not exist")
    wanted = [i for i in ask.image_ids or () if i <= MAX_ID]
    async with db.session(MODULE) as session:
        exists = await session.scalar(
            select(Patient.id).where(Patient.id == ask.patient_id)
        )
        if exists is None:
            raise not_found(f"patient {ask.patient_id} does not exist")
        query = select(*IMAGE_COLUMNS)
        if ask.image_ids is None:
            query = (
                query.where(RadiologyImage.patient_id == ask.patient_id)
                .order_by(RadiologyImage.taken_at.desc(), RadiologyImage.id.desc())
                .limit(max_images)
            )
        else:
            query = query.where(RadiologyImage.id.in_(wanted))
        rows = (await session.execute(query)).all()
    if ask.image_ids is None:
        if not rows:
            raise ApiError(
                422,
                "no_images",
                f"patient {ask.patient_id} has no radiology images to analyse",
            )
        return tuple(_image_ref(storage, row) for row in rows)
    by_id = {row.id: row for row in rows}
    missing = [i for i in ask.image_ids if i not in by_id]
    if missing:
        raise ApiError(
            404, "images_not_found", f"no image has the id(s) {_id_list(missing)}"
        )
    foreign = [i for i in ask.image_ids if by_id[i].patient_id != ask.patient_id]
    if foreign:
        raise bad_request(
            "images_of_another_patient",
            f"image(s) {_id_list(foreign)} do not belong to patient {ask.patient_id}",
        )
    return tuple(_image_ref(storage, by_id[i]) for i in ask.image_ids)


def _image_ref(storage: Path, row) -> ImageRef:
    name = PurePath(row.file_name)
    if name.is_absolute() or ".." in name.parts:
        raise ApiError(
            500,
            "image_path_invalid",
            f"image {row.id}'s file name {row.file_name!r} leaves the image folder",
        )
    return ImageRef(row.id, row.kind, row.taken_at, row.mime_type, storage / name)


# -- reading and encoding (each runs in a worker thread) ---------------------


def _file_missing(image: ImageRef) -> ApiError:
    return ApiError(
        500,
        "image_file_missing",
        f"image {image.id}'s file {image.path.name} is missing from storage",
    )


def read_data_url(image: ImageRef) -> str:
    """The image file as a base64 data URL."""
    try:
        raw = image.path.read_bytes()
    except FileNotFoundError:
        raise _file_missing(image) from None
    encoded = base64.b64encode(raw)
    del raw  # the file's bytes are not needed past this point
    return f"data:{image.mime_type};base64,{encoded.decode('ascii')}"


def shrink_image(image: ImageRef) -> tuple[str, bytes]:
    """The image at most MAX_SIDE_PX on a side: (MIME type, file bytes).

    An image that already fits is sent as it is; a larger one is decoded,
    shrunk and re-encoded as JPEG.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image.path) as picture:
            if max(picture.size) <= MAX_SIDE_PX:
                return image.mime_type, image.path.read_bytes()
            picture.thumbnail((MAX_SIDE_PX, MAX_SIDE_PX))
            mode = "L" if picture.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            out = io.BytesIO()
            picture.convert(mode).save(out, format="JPEG", quality=JPEG_QUALITY)
    except FileNotFoundError:
        raise _file_missing(image) from None
    except UnidentifiedImageError:
        raise ApiError(
            500,
            "image_unreadable",
            f"image {image.id}'s file {image.path.name} is not an image Pillow reads",
        ) from None
    return "image/jpeg", out.getvalue()


def _b64_pieces(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), B64_CHUNK_BYTES):
        yield base64.b64encode(view[start : start + B64_CHUNK_BYTES])


# -- the question to the model ------------------------------------------------


@dataclass(frozen=True)
class ModelCall:
    """One question to the model: where it is, and about which images."""

    http: httpx.AsyncClient
    url: str
    model: str
    deadline_s: float
    patient_id: int
    images: tuple[ImageRef, ...]

    def payload(self, image_urls: Sequence[str]) -> dict[str, Any]:
        """The chat-completions body, the images given as URLs in order."""
        listing = "; ".join(
            f"{n}. {image.kind} taken {image.taken_at:%Y-%m-%d}"
            for n, image in enumerate(self.images, start=1)
        )
        text = (
            f"Patient {self.patient_id}: {len(self.images)} image(s), in this"
            f" order: {listing}. Report your findings per image."
        )
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        parts += [
            {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
            for url in image_urls
        ]
        return {
            "model": self.model,
            "temperature": 0,
            "max_tokens": MAX_ANSWER_TOKENS,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": parts},
            ],
        }


Ask = Callable[[ModelCall], Awaitable[ChatAnswer | ApiError]]


async def ask_all_at_once(call: ModelCall) -> ChatAnswer | ApiError:
    """Naive: every image read and encoded at once, the payload posted whole."""
    # Each read runs in a worker thread, so all of them run side by side
    # while the loop serves other requests; every file is in memory at once.
    urls = await asyncio.gather(
        *(anyio.to_thread.run_sync(read_data_url, image) for image in call.images)
    )
    payload = call.payload(urls)
    return await aiclient.exchange(
        aiclient.send_json, call.http, call.url, payload, deadline_s=call.deadline_s
    )


async def ask_one_at_a_time(call: ModelCall) -> ChatAnswer | ApiError:
    """Optimized: images read and encoded one after another, the payload whole."""
    urls: list[str] = []
    for image in call.images:
        # The read and the encoding run in a worker thread while the loop
        # serves other requests; the file's bytes die with that call, before
        # the next file is opened.
        urls.append(await anyio.to_thread.run_sync(read_data_url, image))
    body = aiclient.encode_json(call.payload(urls))
    del urls  # the body now holds the only copy of the images
    return await aiclient.exchange(
        aiclient.send_released, call.http, call.url, body, deadline_s=call.deadline_s
    )


async def ask_streamed(call: ModelCall) -> ChatAnswer | ApiError:
    """Optimized-plus: images shrunk one at a time into a streamed request body."""
    return await aiclient.exchange(
        aiclient.send_released,
        call.http,
        call.url,
        streamed_body(call),
        deadline_s=call.deadline_s,
    )


def _placeholder(n: int) -> str:
    return f"membench-image-{n}"


async def streamed_body(call: ModelCall) -> AsyncIterator[bytes]:
    """The payload in pieces; each image is read when httpx asks for it."""
    skeleton = aiclient.encode_json(
        call.payload([_placeholder(n) for n in range(len(call.images))])
    )
    pieces: list[bytes] = []
    for n in range(len(call.images)):
        head, _, skeleton = skeleton.partition(f'"{_placeholder(n)}"'.encode())
        pieces.append(head)
    pieces.append(skeleton)
    yield pieces[0]
    for image, tail in zip(call.images, pieces[1:], strict=True):
        # Shrinking decodes the image: a worker thread does it while the loop
        # keeps sending other requests' bytes.
        mime_type, data = await anyio.to_thread.run_sync(shrink_image, image)
        yield f'"data:{mime_type};base64,'.encode()
        for piece in _b64_pieces(data):
            yield piece
        del data  # one image at a time, never the whole payload
        yield b'"' + tail


# -- the route ------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """How many images a form takes, and how it puts them to the model."""

    max_images: int
    ask: Ask


NAIVE = Form(NAIVE_MAX_IMAGES, ask_all_at_once)
OPTIMIZED = Form(OPTIMIZED_MAX_IMAGES, ask_one_at_a_time)
PLUS = Form(OPTIMIZED_MAX_IMAGES, ask_streamed)


async def diagnose(request: Request, form: Form) -> JSONResponse:
    settings = request.app.state.settings
    body = require_object(await request.app.state.read_json(request))
    ask = parse_ask(body, form.max_images)
    images = await find_images(
        request.app.state.db, settings.storage_dir, ask, form.max_images
    )
    call = ModelCall(
        http=request.app.state.ai_client,
        url=aiclient.completions_url(settings.ai_url),
        model=str(settings.extra.get("ai_model", DEFAULT_MODEL)),
        deadline_s=settings.ai_timeout_s,
        patient_id=ask.patient_id,
        images=images,
    )
    outcome = await form.ask(call)
    if isinstance(outcome, ApiError):
        log.warning(
            "diagnosis of patient %s failed: %s %s",
            ask.patient_id,
            outcome.code,
            outcome.message,
        )
        raise outcome
    return JSONResponse(
        {
            "patientId": ask.patient_id,
            "imageIds": [image.id for image in images],
            "imagesAnalyzed": len(images),
            "diagnosis": outcome.content,
            "model": outcome.model,
        }
    )


async def diagnose_naive(request: Request) -> JSONResponse:
    """Up to 10 images read and base64-encoded all at once, posted whole."""
    return await diagnose(request, NAIVE)


async def diagnose_optimized(request: Request) -> JSONResponse:
    """At most 5 images, read and base64-encoded one at a time."""
    return await diagnose(request, OPTIMIZED)


async def diagnose_plus(request: Request) -> JSONResponse:
    """At most 5 images, shrunk to 1024 px and streamed into the request body."""
    return await diagnose(request, PLUS)
