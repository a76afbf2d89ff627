"""Pattern ``body-limit``: reading a JSON request body.

Naive reads any body whole, whatever its size. Optimized refuses a body over
1 MiB with 413: at once when Content-Length says so, else as soon as a
running count of the streamed chunks crosses the limit, so an oversized body
is never held whole.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from reference_impl.errors import ApiError, bad_request

#: The largest JSON body the optimized form accepts.
MAX_JSON_BYTES = 1 * 1024 * 1024


def _require_json_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"expected a JSON body (Content-Type: application/json), "
            f"got {content_type or 'none'!r}",
        )


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    # ValueError covers JSONDecodeError and integers past Python's 4300-digit
    # limit; RecursionError, arrays or objects nested a few thousand deep.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad_request(
            "invalid_json", f"the body is not valid JSON: {exc}"
        ) from None


def _too_large(size: str) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"the JSON body is {size}; the maximum is {MAX_JSON_BYTES} bytes",
    )


async def read_json_naive(request: Request) -> Any:
    """Read the whole body, whatever its size, then parse it."""
    _require_json_type(request)
    return _parse(await request.body())


async def read_json_limited(request: Request) -> Any:
    """Refuse bodies over the limit before holding them whole."""
    _require_json_type(request)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(
                "invalid_content_length", f"Content-Length={declared!r} is not a number"
            )
        if int(declared) > MAX_JSON_BYTES:
            raise _too_large(f"{declared} bytes by its Content-Length")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > MAX_JSON_BYTES:
            # Stop reading: the rest of the body stays in the socket and the
            # server closes the connection after the answer.
            raise _too_large(f"over {received} bytes and still streaming")
        chunks.append(chunk)
    return _parse(b"".join(chunks))


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(
            "invalid_body", f"expected a JSON object, got {type(body).__name__}"
        )
    return body
