"""Where a handler's memory goes: one request served in this process by
calling the pattern's handler directly, line by line (memory_profiler) or
by allocation (tracemalloc).

The server process under load is measured by the harness; these profiles
look inside one request instead, in the notebook's own process, so their
MiB are of that process and of one request at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

MIB = 1024 * 1024
#: Size of the body chunks a request is fed in, as a server would.
CHUNK_BYTES = 64 * 1024

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Call:
    """One request to hand to a handler."""

    method: str = "GET"
    path: str = "/"
    path_params: dict[str, Any] | None = None
    query: str = ""
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def request(self, app: Starlette) -> Request:
        chunks = [
            self.body[i : i + CHUNK_BYTES]
            for i in range(0, len(self.body), CHUNK_BYTES)
        ] or [b""]
        pending = list(reversed(chunks))

        async def receive() -> dict[str, Any]:
            if not pending:
                return {"type": "http.disconnect"}
            chunk = pending.pop()
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

        headers = [(k.lower().encode(), v.encode()) for k, v in self.headers]
        if self.body:
            headers.append((b"content-length", str(len(self.body)).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query.encode(),
            "headers": headers,
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 50000),
            "path_params": dict(self.path_params or {}),
            "app": app,
        }
        return Request(scope, receive)


@asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[Starlette]:
    """The app with its lifespan entered (engine, AI client), as a server runs it."""
    async with app.router.lifespan_context(app):
        yield app


@dataclass(frozen=True)
class Workspace:
    """A private copy of a preset's dataset: its database copied, its image
    files linked, so a profiled upload writes nowhere shared."""

    dataset: Path
    db_url: str
    storage: Path
    manifest: dict[str, Any]

    @classmethod
    def create(cls, preset: str, folder: Path) -> Workspace:
        from benchmarks import runner
        from benchmarks.harness import copy_sqlite, link_tree
        from reference_impl.server import sqlite_url

        dataset = runner.ensure_dataset(preset, None, None)
        manifest = json.loads((dataset / "manifest.json").read_text())
        folder.mkdir(parents=True, exist_ok=True)
        database = folder / "clinic.sqlite"
        if not database.exists():
            copy_sqlite(dataset / manifest["database"], database)
        storage = folder / "images"
        if not storage.exists():
            link_tree(dataset / manifest["images"], storage)
        return cls(dataset, sqlite_url(database), storage, manifest)

    def app(self, variant: str, ai_url: str | None = None) -> Starlette:
        from reference_impl.app import create_app
        from reference_impl.config import DEFAULT_AI_URL, Settings

        return create_app(
            Settings.for_variant(
                variant,
                db_url=self.db_url,
                storage_dir=self.storage,
                ai_url=ai_url or DEFAULT_AI_URL,
            )
        )


@contextlib.contextmanager
def ai_stub(log_path: Path) -> Iterator[str]:
    """A local AI stand-in on a free port for the diagnosis route; its base URL."""
    from benchmarks.serverproc import ServerProcess, free_port, membench_command

    port = free_port()
    command = membench_command("ai-stub", "--port", str(port))
    with ServerProcess(command, port=port, log_path=log_path) as stub:
        yield f"{stub.base_url}/v1"


@dataclass(frozen=True)
class LineProfile:
    """memory_profiler's table for one call, and the response it gave."""

    table: str
    status: int
    body_bytes: int


async def line_profile(app: Starlette, handler: Handler, call: Call) -> LineProfile:
    """RSS after each line of ``handler`` for one request.

    memory_profiler traces the thread it is enabled in; the handler's
    coroutine runs on this thread's event loop (the notebook kernel's), so
    every line of it is traced while the database work happens elsewhere.
    """
    from memory_profiler import LineProfiler, show_results

    profiler = LineProfiler(backend="psutil")
    response = await profiler(handler)(call.request(app))
    stream = io.StringIO()
    show_results(profiler, stream=stream, precision=1)
    return LineProfile(stream.getvalue(), response.status_code, len(response.body))


@dataclass(frozen=True)
class Allocations:
    """What tracemalloc saw during one call."""

    peak_mib: float
    body_mib: float
    moment: str
    top_sites: list[tuple[str, float, int]]

    @property
    def peak_per_body(self) -> float:
        """Bytes traced at the peak for each byte of the response body."""
        return self.peak_mib / self.body_mib if self.body_mib else float("nan")


#: Frames kept per allocation, enough to reach the package's own line.
TRACE_FRAMES = 40
PACKAGE_MARKER = "/reference_impl/"


async def allocations(
    app: Starlette, handler: Handler, call: Call, top: int = 8
) -> Allocations:
    """Traced peak of one call, and the package lines that hold the most.

    The snapshot is taken when a JSON answer has just been rendered, while
    everything the handler built to render it is still alive; a handler
    that renders no JSON is snapshotted when it returns. Each allocation is
    charged to the innermost line of ``reference_impl`` on its stack, so the
    sites are lines of the handler's own code, whatever library did the
    allocating underneath.
    """
    from starlette.responses import JSONResponse

    snapshots: list[tracemalloc.Snapshot] = []
    render = JSONResponse.render

    def render_and_snapshot(self, content: Any) -> bytes:
        body = render(self, content)
        if not snapshots:
            snapshots.append(tracemalloc.take_snapshot())
        return body

    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start(TRACE_FRAMES)
    JSONResponse.render = render_and_snapshot  # type: ignore[method-assign]
    try:
        tracemalloc.clear_traces()
        tracemalloc.reset_peak()
        response = await handler(call.request(app))
        _current, peak = tracemalloc.get_traced_memory()
        moment = "as the JSON answer is rendered" if snapshots else "at return"
        snapshot = snapshots[0] if snapshots else tracemalloc.take_snapshot()
    finally:
        JSONResponse.render = render  # type: ignore[method-assign]
        if not already:
            tracemalloc.stop()
    return Allocations(
        peak / MIB, len(response.body) / MIB, moment, _package_sites(snapshot, top)
    )


def _package_sites(
    snapshot: tracemalloc.Snapshot, top: int
) -> list[tuple[str, float, int]]:
    """(package line, MiB, blocks), largest first."""
    sizes: dict[str, list[int]] = {}
    for stat in snapshot.statistics("traceback"):
        site = "no package line on its stack (database thread, libraries)"
        # A traceback runs from the oldest frame to the most recent.
        for frame in reversed(stat.traceback):
            if PACKAGE_MARKER in frame.filename:
                short = frame.filename.split(PACKAGE_MARKER, 1)[1]
                site = f"reference_impl/{short}:{frame.lineno}"
                break
        entry = sizes.setdefault(site, [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    ranked = sorted(sizes.items(), key=lambda item: item[1][0], reverse=True)
    return [(site, size / MIB, count) for site, (size, count) in ranked[:top]]


# -- forced collection between images ------------------------------------------


def encode_rounds(paths: list[str], rounds: int, collect: bool) -> dict[str, float]:
    """Encode the images one at a time, as the optimized diagnosis does, for
    ``rounds`` requests' worth; with ``collect``, ``gc.collect()`` after each
    image, as the original's ``global.gc()``. Run it in a fresh process: the
    peak is that process's VmHWM."""
    import gc
    import mimetypes
    import time

    from reference_impl import procstats
    from reference_impl.patterns.encoding import ImageRef, read_data_url

    images = [
        ImageRef(n, "radiograph", None, mimetypes.guess_type(p)[0] or "", Path(p))
        for n, p in enumerate(paths, start=1)
    ]
    baseline_mib = procstats.rss_mib()
    start = time.perf_counter()
    for _ in range(rounds):
        urls = []
        for image in images:
            urls.append(read_data_url(image))
            if collect:
                gc.collect()
        body = json.dumps({"images": urls}).encode()
        del urls, body
    return {
        "baseline_mib": baseline_mib,
        "peak_mib": procstats.hwm_mib(),
        "end_mib": procstats.rss_mib(),
        "elapsed_s": time.perf_counter() - start,
    }


def encode_rounds_fresh(
    paths: list[str], rounds: int, collect: bool
) -> dict[str, float]:
    """:func:`encode_rounds` in a new interpreter, so no run colours the next."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(encode_rounds, paths, rounds, collect).result()
