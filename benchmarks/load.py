"""The load driver: a planned list of requests sent with asyncio and httpx.

``drive()`` runs ``concurrency`` workers over one ``httpx.AsyncClient`` whose
pool holds as many connections. Each worker takes the next request of the
plan, sends it and reads the whole answer, counting its bytes and keeping
none of them (a naive listing answers hundreds of MB, which the driver must
not hold), then records when it started, its route, its status and how long
it took. A request that gets no answer (refused, reset, timed out) is
recorded with status 0 and its error's name.

The load is bounded twice: by the plan's length and by ``timeout_s``. Past
the deadline no request is started, requests still in flight are cancelled
(recorded as ``Cancelled``), and what was never sent is counted as
``not_sent``. An ``abort`` callable, polled every 100 ms, stops the load the
same way (the harness passes "the server has died").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("benchmarks")

#: Status recorded for a request that got no HTTP answer.
NO_ANSWER = 0


@dataclass(frozen=True)
class Request:
    """One planned request. ``route`` names it in latency.csv and the summary.

    ``early_answer`` marks a body the server may refuse before reading it
    (an oversized JSON body): it is sent by :func:`_send_early`, which
    reads while it writes.
    """

    route: str
    method: str
    path: str
    json_bytes: bytes | None = None
    file: tuple[str, bytes, str] | None = None
    early_answer: bool = False

    def send_kwargs(self) -> dict[str, Any]:
        if self.json_bytes is not None:
            return {
                "content": self.json_bytes,
                "headers": {"content-type": "application/json"},
            }
        if self.file is not None:
            return {"files": {"file": self.file}}
        return {}


@dataclass
class Record:
    t_s: float
    route: str
    status: int
    latency_ms: float
    error: str | None = None


@dataclass
class LoadResult:
    """What one load (warm-up or measured) did."""

    planned: int
    records: list[Record] = field(default_factory=list)
    started_s: float = 0.0
    finished_s: float = 0.0
    response_bytes: int = 0
    timed_out: bool = False
    aborted: bool = False

    @property
    def sent(self) -> int:
        return len(self.records)

    @property
    def not_sent(self) -> int:
        return self.planned - len(self.records)

    @property
    def duration_s(self) -> float:
        return self.finished_s - self.started_s

    def errors(self) -> Counter[str]:
        return Counter(r.error for r in self.records if r.error is not None)


ProgressFn = Callable[[int, int, int], None]


async def _send(
    client: httpx.AsyncClient, request: Request, t0: float
) -> tuple[Record, int]:
    started = time.monotonic()
    status = NO_ANSWER
    error = None
    size = 0
    try:
        async with client.stream(
            request.method, request.path, **request.send_kwargs()
        ) as response:
            async for chunk in response.aiter_raw():
                size += len(chunk)
            status = response.status_code
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    latency_ms = (time.monotonic() - started) * 1000
    return Record(started - t0, request.route, status, latency_ms, error), size


#: Bytes written at a time by ``_send_early``.
EARLY_CHUNK_BYTES = 256 * 1024


async def _send_early(
    host: str, port: int, request: Request, t0: float, timeout_s: float
) -> tuple[Record, int]:
    """Send a JSON body while reading, so an answer given before the body is
    read whole (413) is seen.

    httpx writes the whole body before it reads: when the server answers
    early and closes, the rest of the write meets a reset and the answer is
    lost (``ReadError``). Here the body goes out in chunks on a task of its
    own while the answer is read from the same socket; once a status line is
    in, the writing stops and a reset is no longer an error. The socket is
    used directly: an asyncio stream would turn the writer's reset into an
    error of the reader, dropping an answer already received. One
    connection per request, closed afterwards.
    """
    loop = asyncio.get_running_loop()
    body = request.json_bytes or b""
    head = (
        f"{request.method} {request.path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()

    async def send_body(sock: socket.socket) -> None:
        await loop.sock_sendall(sock, head)
        view = memoryview(body)
        for offset in range(0, len(body), EARLY_CHUNK_BYTES):
            await loop.sock_sendall(sock, view[offset : offset + EARLY_CHUNK_BYTES])

    started = time.monotonic()
    status = NO_ANSWER
    error = None
    size = 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sending: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
            sending = asyncio.create_task(send_body(sock))
            received = b""
            while b"\r\n" not in received:
                chunk = await loop.sock_recv(sock, 65536)
                if not chunk:
                    raise ConnectionResetError("closed before an answer")
                received += chunk
            status = int(received.split(b"\r\n", 1)[0].split()[1])
            size = len(received)
            # The rest of the answer, until the server closes the connection.
            with contextlib.suppress(OSError):
                while chunk := await loop.sock_recv(sock, 65536):
                    size += len(chunk)
    except TimeoutError:
        error = "ReadTimeout"
    except (OSError, ValueError, IndexError) as exc:
        error = type(exc).__name__
    finally:
        if sending is not None:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sending
        sock.close()
    latency_ms = (time.monotonic() - started) * 1000
    return Record(started - t0, request.route, status, latency_ms, error), size


async def drive(
    base_url: str,
    plan: Sequence[Request],
    *,
    concurrency: int,
    timeout_s: float,
    t0: float,
    request_timeout_s: float = 120.0,
    abort: Callable[[], bool] | None = None,
    progress: ProgressFn | None = None,
    progress_every: int | None = None,
    progress_every_s: float = 20.0,
    result: LoadResult | None = None,
) -> LoadResult:
    """Send ``plan`` with ``concurrency`` requests in flight; see the module doc.

    ``t0`` is the ``time.monotonic()`` reading that record times count from.
    ``progress(done, planned, no_answer_so_far)`` is called every
    ``progress_every`` answers, and every ``progress_every_s`` seconds.
    Records go into ``result`` as they come, so a caller that passes one
    keeps them even if the load is interrupted.
    """
    if result is None:
        result = LoadResult(planned=len(plan))
    result.planned = len(plan)
    if not plan:
        return result
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency
    )
    timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s))
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    next_index = 0
    no_answer = 0
    stop = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, no_answer
        while not stop.is_set() and next_index < len(plan):
            request = plan[next_index]
            next_index += 1
            started = time.monotonic()
            try:
                if request.early_answer:
                    record, size = await _send_early(
                        host, port, request, t0, request_timeout_s
                    )
                else:
                    record, size = await _send(client, request, t0)
            except asyncio.CancelledError:
                # Cancelled at the deadline: recorded, then the cancellation
                # goes on.
                elapsed_ms = (time.monotonic() - started) * 1000
                result.records.append(
                    Record(
                        started - t0, request.route, NO_ANSWER, elapsed_ms, "Cancelled"
                    )
                )
                raise
            result.records.append(record)
            result.response_bytes += size
            if record.status == NO_ANSWER:
                no_answer += 1
            done = len(result.records)
            if progress and progress_every and done % progress_every == 0:
                progress(done, result.planned, no_answer)

    async def watch(deadline: float) -> None:
        # Wakes every 100 ms; the workers keep the event loop otherwise.
        next_report = time.monotonic() + progress_every_s
        while not stop.is_set():
            if progress and time.monotonic() >= next_report:
                # Slow requests: a line now and then even between counts.
                progress(len(result.records), result.planned, no_answer)
                next_report = time.monotonic() + progress_every_s
            if time.monotonic() >= deadline:
                result.timed_out = True
                stop.set()
            elif abort is not None and abort():
                result.aborted = True
                stop.set()
            await asyncio.sleep(0.1)

    result.started_s = time.monotonic() - t0
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        workers = [
            asyncio.create_task(worker(client))
            for _ in range(min(concurrency, len(plan)))
        ]
        watcher = asyncio.create_task(watch(deadline))
        all_done = asyncio.gather(*workers)
        try:
            # Workers stop taking requests once ``stop`` is set; what is in
            # flight then gets a short grace before it is cancelled.
            while not all_done.done():
                await asyncio.wait({all_done}, timeout=0.1)
                if stop.is_set() and not all_done.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(all_done), 2.0)
                    break
        finally:
            stop.set()
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await all_done
    result.finished_s = time.monotonic() - t0
    return result


def run(base_url: str, plan: Sequence[Request], **kwargs: Any) -> LoadResult:
    """``drive()`` on a fresh event loop, for callers that are not async."""
    return asyncio.run(drive(base_url, plan, **kwargs))
