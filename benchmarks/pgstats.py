"""What a PostgreSQL server holds for the clients of one database.

An app that opens a connection per request costs the server a backend
process per connection. ``PgSampler`` watches that cost beside the app's own
RSS: every ``interval_s`` it counts the database's connections (from
``pg_stat_activity``) and sums the RSS of their backend processes and of the
whole server (the postmaster and all its children), read from ``/proc``.

The server must run on this machine: its processes are read from ``/proc``.
Summed RSS counts each shared page (``shared_buffers``, the server's code)
once per process that touched it, so it overstates what the server holds;
``backends_anon_mib`` sums only the anonymous (private) pages, which are not
shared, as the lower bound.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from reference_impl.procstats import MIB, PAGE_BYTES

log = logging.getLogger("benchmarks")

#: Client backends of the sampled database, leaving out the sampler's own.
CLIENTS_SQL = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND usename IS NOT NULL
"""


class PgStatsError(RuntimeError):
    """Raised when the server cannot be sampled (not reachable, not local)."""


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.split(":", 1)[0].split("+", 1)[0] in {
        "postgresql",
        "postgres",
    }


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (or ``+psycopg``) as a DSN asyncpg takes."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _statm_pages(pid: int) -> tuple[int, int] | None:
    """(resident, resident and shared) pages of a process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            values = fh.read().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(values[1]), int(values[2])


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        # The command name in parentheses may hold spaces: split after it.
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as fh:
            return [int(part) for part in fh.read().split()]
    except FileNotFoundError:
        import psutil

        return [child.pid for child in psutil.Process(pid).children()]


@dataclass(frozen=True)
class ServerSample:
    """One look at the server; memory in MiB."""

    t_s: float
    connections: int
    backends_rss_mib: float
    backends_anon_mib: float
    server_processes: int
    server_rss_mib: float


def read_server(t_s: float, postmaster: int, clients: list[int]) -> ServerSample:
    """Sum ``/proc`` figures over the clients' backends and the whole server."""
    backends_rss = backends_anon = 0
    for pid in clients:
        pages = _statm_pages(pid)
        if pages is not None:
            backends_rss += pages[0]
            backends_anon += pages[0] - pages[1]
    server_rss = processes = 0
    for pid in [postmaster, *children(postmaster)]:
        pages = _statm_pages(pid)
        if pages is not None:
            server_rss += pages[0]
            processes += 1
    return ServerSample(
        t_s=round(t_s, 4),
        connections=len(clients),
        backends_rss_mib=round(backends_rss * PAGE_BYTES / MIB, 2),
        backends_anon_mib=round(backends_anon * PAGE_BYTES / MIB, 2),
        server_processes=processes,
        server_rss_mib=round(server_rss * PAGE_BYTES / MIB, 2),
    )


class PgSampler:
    """Samples a local PostgreSQL server on a thread of its own.

    Use as a context manager, or call ``start()`` and ``stop()``. The thread
    runs its own event loop with one asyncpg connection, so it neither shares
    nor slows the caller's loop. ``t0``, a ``time.monotonic()`` reading as
    ``benchmarks.sampler`` takes, lines its times up with the RSS samples.
    """

    def __init__(
        self, url: str, interval_s: float = 0.1, t0: float | None = None
    ) -> None:
        if not is_postgres(url):
            raise PgStatsError(f"{url!r} is not a PostgreSQL URL")
        self.url = url
        self.interval_s = interval_s
        self.t0 = t0
        self.samples: list[ServerSample] = []
        self.postmaster_pid: int | None = None
        self.backend_pids_seen: set[int] = set()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> PgSampler:
        if self.t0 is None:
            self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="pgstats", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise PgStatsError(f"no first sample within {timeout_s} s")
        if self._error is not None:
            raise PgStatsError(f"cannot sample the server: {self._error}") from (
                self._error
            )
        return self

    def stop(self) -> list[ServerSample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        return self.samples

    def __enter__(self) -> PgSampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            if self._ready.is_set():
                log.warning("server sampling stopped early: %s", exc)
            self._error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(asyncpg_dsn(self.url), timeout=10)
        try:
            own_pid = await conn.fetchval("SELECT pg_backend_pid()")
            self.postmaster_pid = parent_pid(own_pid)
            while True:
                await self._sample(conn)
                self._ready.set()
                if self._stop.is_set():
                    break
                # The stop flag is checked once per interval: stop() waits
                # at most that long for the final sample.
                await asyncio.sleep(self.interval_s)
        finally:
            await conn.close()

    async def _sample(self, conn) -> None:
        clients = [row["pid"] for row in await conn.fetch(CLIENTS_SQL)]
        self.backend_pids_seen.update(clients)
        assert self.postmaster_pid is not None and self.t0 is not None
        self.samples.append(
            read_server(time.monotonic() - self.t0, self.postmaster_pid, clients)
        )

    def summary(self) -> dict[str, Any]:
        return summarize(self.samples, self.interval_s, self.backend_pids_seen)

    def write_csv(self, path: Path) -> None:
        write_csv(self.samples, path)


def summarize(
    samples: list[ServerSample],
    interval_s: float,
    backend_pids_seen: set[int] | None = None,
) -> dict[str, Any]:
    """The ``db_server`` block of ``run.json``: peaks, first and last sample."""
    if not samples:
        raise PgStatsError("no server samples to summarize")
    first, last = samples[0], samples[-1]
    summary: dict[str, Any] = {
        "connections_max": max(s.connections for s in samples),
        "connections_mean": round(
            sum(s.connections for s in samples) / len(samples), 2
        ),
        "connections_end": last.connections,
        "backends_rss_mib_baseline": first.backends_rss_mib,
        "backends_rss_mib_peak": max(s.backends_rss_mib for s in samples),
        "backends_rss_mib_end": last.backends_rss_mib,
        "backends_anon_mib_peak": max(s.backends_anon_mib for s in samples),
        "server_rss_mib_baseline": first.server_rss_mib,
        "server_rss_mib_peak": max(s.server_rss_mib for s in samples),
        "server_rss_mib_end": last.server_rss_mib,
        "server_processes_max": max(s.server_processes for s in samples),
        "sampler": {"interval_ms": round(interval_s * 1000), "samples": len(samples)},
    }
    if backend_pids_seen is not None:
        summary["backends_seen"] = len(backend_pids_seen)
    return summary


CSV_FIELDS = [f.name for f in fields(ServerSample)]


def write_csv(samples: list[ServerSample], path: Path) -> None:
    """``pg.csv``: one row per sample, the ``ServerSample`` fields as columns."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
