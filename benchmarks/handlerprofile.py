"""Where a handler's memory goes: one request served in this process by
calling the pattern's handler directly, with tracemalloc counting, line by
line and by the package line behind each allocation.

The server process under load is measured by the harness; these profiles
look inside one request instead, in the notebook's own process, so their
MiB are of that process and of one request at a time.
"""

from __future__ import annotations

import contextlib
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
        from benchmarks.workspace import copy_sqlite, link_tree
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


def multipart_call(
    path: str, path_params: dict[str, Any], file_bytes: bytes, fields: dict[str, str]
) -> Call:
    """A ``multipart/form-data`` POST with one file field ``file``, encoded
    as a browser (or httpx) would send it."""
    import httpx

    request = httpx.Request(
        "POST",
        f"http://127.0.0.1{path}",
        files={"file": ("radiograph.jpg", file_bytes, "image/jpeg")},
        data=fields,
    )
    body = request.read()
    return Call(
        "POST",
        path,
        path_params=path_params,
        body=body,
        headers=(("content-type", request.headers["content-type"]),),
    )


def json_call(path: str, body: bytes) -> Call:
    return Call(
        "POST", path, body=body, headers=(("content-type", "application/json"),)
    )


@dataclass(frozen=True)
class Profile:
    """What tracemalloc saw during one call of a handler."""

    status: int
    body_mib: float
    peak_mib: float
    #: (function name, first line, [(line number, MiB, source)])
    lines: list[tuple[str, int, list[tuple[int, float | None, str]]]]
    #: (package line, MiB, blocks) at the traced peak, largest first.
    top_sites: list[tuple[str, float, int]]
    sites_at_mib: float

    @property
    def peak_per_body(self) -> float:
        """Bytes traced at the peak for each byte of the response body."""
        return self.peak_mib / self.body_mib if self.body_mib else float("nan")

    def table(self) -> str:
        """Each profiled function's lines with the most memory traced while
        the line ran (MiB over the request's start, callees included)."""
        out = []
        for name, _first, rows in self.lines:
            out.append(f"{name}  (most MiB traced while the line ran)")
            for number, mib, source in rows:
                shown = f"{mib:9.2f}" if mib is not None else " " * 9
                out.append(f"{number:5d} {shown}  {source}")
            out.append("")
        return "\n".join(out)

    def sites(self) -> str:
        out = [
            f"held at {self.sites_at_mib:.2f} MiB traced (the highest point seen"
            f" between lines; the peak was {self.peak_mib:.2f} MiB), by the"
            " package line behind each allocation:"
        ]
        for site, mib, count in self.top_sites:
            out.append(f"  {mib:9.2f} MiB {count:8d} blocks  {site}")
        return "\n".join(out)


#: Frames kept per allocation, enough to reach the package's own line.
TRACE_FRAMES = 25
PACKAGE_MARKER = "/reference_impl/"
#: A new snapshot is taken when traced memory passes the last one by this much.
SNAPSHOT_STEP = 1.1


class _LineTracer:
    """A ``sys.settrace`` hook on the given functions' frames: for each of
    their lines, the most memory tracemalloc counted while it ran; at each
    new high seen between lines, a snapshot.

    Coroutine frames are traced across their suspensions: each resumption is
    a new ``call`` event, and a line's figure is the most seen over all of
    its runs. Only this thread is traced; the event loop runs the handler
    here, so every line of it is seen.
    """

    def __init__(self, functions: tuple[Callable, ...]) -> None:
        self.codes = {inspect_code(f) for f in functions}
        self.during_line: dict[tuple[Any, int], int] = {}
        self.peak_bytes = 0
        self.current_line: dict[int, int] = {}
        self.best: tracemalloc.Snapshot | None = None
        self.best_bytes = 0

    def __call__(self, frame, event, arg):
        if frame.f_code not in self.codes:
            return None
        # A call, or a coroutine resumed: the frame stands on this line.
        self.current_line[id(frame)] = frame.f_lineno
        self._note(frame)
        return self._local

    def _local(self, frame, event, arg):
        # "line": the line before this one has run; "return": the frame ends
        # or suspends on its current line.
        self._note(frame)
        if event == "line":
            self.current_line[id(frame)] = frame.f_lineno
        return self._local

    def _note(self, frame) -> None:
        # The peak since the last event is the most memory held while the
        # frame's current line ran, callees and all.
        traced, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        self.peak_bytes = max(self.peak_bytes, peak)
        key = (frame.f_code, self.current_line[id(frame)])
        self.during_line[key] = max(self.during_line.get(key, 0), peak)
        self.maybe_snapshot(traced)

    def maybe_snapshot(self, traced: int) -> None:
        if traced > self.best_bytes * SNAPSHOT_STEP:
            self.best = tracemalloc.take_snapshot()
            self.best_bytes = traced


def inspect_code(function: Callable) -> Any:
    import inspect

    return inspect.unwrap(function).__code__


async def profile(
    app: Starlette, handler: Handler, call: Call, also: tuple[Callable, ...] = ()
) -> Profile:
    """One request to ``handler`` with tracemalloc on: the traced peak, the
    memory after each line of ``handler`` and of the functions in ``also``
    that it calls, and the package lines holding the most at the highest
    point seen.

    Allocations are charged to the innermost line of ``reference_impl`` on
    their stack, whatever library did the allocating underneath. Memory is
    counted from the request's start; the database driver's thread
    allocates too, and is counted, but has no package line of its own.
    """
    import sys

    from starlette.responses import JSONResponse

    tracer = _LineTracer((handler, *also))
    render = JSONResponse.render

    def render_and_note(self, content: Any) -> bytes:
        # Rendering is where a JSON answer's dicts and its bytes coexist.
        body = render(self, content)
        tracer.maybe_snapshot(tracemalloc.get_traced_memory()[0])
        return body

    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start(TRACE_FRAMES)
    JSONResponse.render = render_and_note  # type: ignore[method-assign]
    previous = sys.gettrace()
    try:
        request = call.request(app)  # its body chunks are not the handler's
        tracemalloc.clear_traces()
        tracemalloc.reset_peak()
        sys.settrace(tracer)
        try:
            response = await handler(request)
        finally:
            sys.settrace(previous)
        peak = max(tracer.peak_bytes, tracemalloc.get_traced_memory()[1])
    finally:
        JSONResponse.render = render  # type: ignore[method-assign]
        if not already:
            tracemalloc.stop()
    snapshot = tracer.best
    return Profile(
        status=response.status_code,
        body_mib=len(getattr(response, "body", b"")) / MIB,
        peak_mib=peak / MIB,
        lines=[_line_rows(f, tracer.during_line) for f in (handler, *also)],
        top_sites=_package_sites(snapshot) if snapshot else [],
        sites_at_mib=tracer.best_bytes / MIB,
    )


def _line_rows(
    function: Callable, during_line: dict[tuple[Any, int], int]
) -> tuple[str, int, list[tuple[int, float | None, str]]]:
    import inspect

    code = inspect_code(function)
    source, first = inspect.getsourcelines(inspect.unwrap(function))
    rows = []
    for offset, text in enumerate(source):
        number = first + offset
        value = during_line.get((code, number))
        rows.append((number, None if value is None else value / MIB, text.rstrip()))
    return code.co_qualname, first, rows


def _library(traceback: tracemalloc.Traceback) -> str:
    """The library at the root of a stack without a package line: SQLAlchemy's
    greenlet (ORM rows), a worker thread, the standard library."""
    for frame in traceback:
        if "site-packages/" in frame.filename:
            return frame.filename.split("site-packages/", 1)[1].split("/", 1)[0]
    return Path(traceback[-1].filename).name


def _package_sites(
    snapshot: tracemalloc.Snapshot, top: int = 8
) -> list[tuple[str, float, int]]:
    """(package line, MiB, blocks), largest first."""
    sizes: dict[str, list[int]] = {}
    for stat in snapshot.statistics("traceback"):
        site = f"{_library(stat.traceback)} (no package line on its stack)"
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
