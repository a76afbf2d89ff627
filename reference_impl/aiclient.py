"""An OpenAI-style chat-completions client over the app's ``httpx.AsyncClient``.

Two ways to send a request body, and one way to read the answer:

- :func:`send_json` posts with httpx's ``json=``, as most code does. The
  response it leaves behind keeps the request, and so the whole encoded
  payload, alive until the cycle collector runs (see below).
- :func:`send_released` sends bytes or an async iterator of bytes, reads at
  most :data:`MAX_ANSWER_BYTES` of the answer, closes the response and breaks
  that cycle, so the body is freed by reference counting alone.
- :func:`exchange` runs either under one deadline and turns every failure of
  the AI service into an :class:`~reference_impl.errors.ApiError` that it
  *returns*: raising it would keep the traceback's frames, and the payload
  they hold, alive as long as the error.

The cycle (httpx 0.28-0.29): ``AsyncClient.send`` wraps the response's stream
in a ``BoundAsyncStream`` that points back at the response, so a response is
always in a reference cycle. The response holds ``response.request``, whose
``stream`` and ``content`` hold the request body. Closing the response does
not break the cycle; assigning ``response.stream`` another stream does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from reference_impl.errors import ApiError

#: The largest answer read from the AI service; a chat completion is a few KiB.
MAX_ANSWER_BYTES = 1 * 1024 * 1024

#: Characters of an unusable answer quoted in an error message.
SNIPPET_CHARS = 160

Body = bytes | AsyncIterator[bytes]
Sender = Callable[[httpx.AsyncClient, str, Any], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class ChatAnswer:
    """What the model answered: its name and the JSON object it wrote."""

    model: str
    content: dict[str, Any]
    usage: dict[str, Any] | None = None


class AnswerTooLarge(Exception):
    """Raised when the AI service answers more than MAX_ANSWER_BYTES."""


def completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def encode_json(payload: dict[str, Any]) -> bytes:
    """Compact JSON bytes, as httpx's ``json=`` would send them."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


async def send_json(
    http: httpx.AsyncClient, url: str, payload: dict[str, Any]
) -> tuple[int, bytes]:
    """httpx's own way; the response's cycle keeps the payload until gc runs."""
    response = await http.post(url, json=payload)
    return response.status_code, response.content


async def send_released(
    http: httpx.AsyncClient, url: str, body: Body
) -> tuple[int, bytes]:
    """Send ``body`` and read the answer; nothing keeps the body afterwards."""
    request = http.build_request(
        "POST", url, content=body, headers={"Content-Type": "application/json"}
    )
    try:
        response = await http.send(request, stream=True)
        try:
            return response.status_code, await _read_bounded(response)
        finally:
            # Shielded: after a deadline every await in its scope is cancelled
            # again, which would skip the close and leave the cycle below.
            with anyio.CancelScope(shield=True):
                await response.aclose()
            # The response's stream points back at the response: replacing it
            # breaks the cycle, so the request and its body go with the last
            # reference, whenever the cycle collector runs.
            response.stream = httpx.ByteStream(b"")
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            # A body cut short (deadline, refused connection) is suspended
            # mid-way; closing it drops what its frame holds now.
            with anyio.CancelScope(shield=True):
                await aclose()


async def _read_bounded(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.aiter_bytes():
        received += len(chunk)
        if received > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(f"over {received} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def exchange(
    send: Sender,
    http: httpx.AsyncClient,
    url: str,
    body: Any,
    *,
    deadline_s: float,
) -> ChatAnswer | ApiError:
    """Send ``body`` with ``send``; the model's answer, or the error to answer with.

    ``deadline_s`` bounds the whole exchange (httpx's own timeout applies to
    each read and write, so a service that trickles bytes would never trip it).
    """
    try:
        with anyio.fail_after(deadline_s):
            status, data = await send(http, url, body)
    except (TimeoutError, httpx.TimeoutException):
        return ApiError(
            504,
            "ai_timeout",
            f"the AI service at {url} did not answer within {deadline_s:g} s",
        )
    except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
        return ApiError(
            502, "ai_unavailable", f"cannot reach the AI service at {url}: {exc}"
        )
    except httpx.TransportError as exc:
        return ApiError(
            502,
            "ai_unavailable",
            f"the AI service at {url} dropped the connection: {exc!r}",
        )
    except AnswerTooLarge as exc:
        return ApiError(
            502,
            "ai_bad_response",
            f"the AI service's answer is {exc}; at most {MAX_ANSWER_BYTES} are read",
        )
    return parse_answer(status, data)


def parse_answer(status: int, data: bytes) -> ChatAnswer | ApiError:
    """A chat completion whose message is a JSON object, or why it is not one."""
    if not 200 <= status < 300:
        return ApiError(
            502,
            "ai_error",
            f"the AI service answered {status}: {_error_message(data)}",
        )
    try:
        completion = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _bad_answer(f"answer is not JSON: {_snippet(data)}")
    try:
        content = completion["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return _bad_answer(
            f"answer has no choices[0].message.content: {_snippet(data)}"
        )
    if not isinstance(content, str):
        return _bad_answer(
            f"message content is a {type(content).__name__}, not a string"
        )
    try:
        diagnosis = json.loads(_strip_fence(content))
    except json.JSONDecodeError:
        return _bad_answer(f"message content is not JSON: {_snippet(content)}")
    if not isinstance(diagnosis, dict):
        return _bad_answer(
            f"message content is a JSON {type(diagnosis).__name__}, not an object"
        )
    model = completion.get("model")
    usage = completion.get("usage")
    return ChatAnswer(
        model=model if isinstance(model, str) else "unknown",
        content=diagnosis,
        usage=usage if isinstance(usage, dict) else None,
    )


def _strip_fence(content: str) -> str:
    """Models asked for JSON sometimes wrap it in a Markdown code fence."""
    text = content.strip()
    if text.startswith("```") and text.endswith("```"):
        text = text[3:-3]
        first_line, _, rest = text.partition("\n")
        text = rest if first_line.strip().lower() in ("", "json") else text
    return text


def _bad_answer(message: str) -> ApiError:
    return ApiError(502, "ai_bad_response", f"the AI service's {message}")


def _error_message(data: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error, else the start of the body."""
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return _snippet(data)
    return repr(message[:SNIPPET_CHARS]) if isinstance(message, str) else _snippet(data)


def _snippet(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data[: SNIPPET_CHARS * 4].decode("utf-8", errors="replace")
    if not data:
        return "(empty)"
    return repr(data[:SNIPPET_CHARS])
