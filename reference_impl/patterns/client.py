"""Pattern ``client``: how the API gets to its database.

The original created a PrismaClient in every API file and connected and
disconnected it on every request. The fix kept one client per process whose
pool is reused. Here the two forms differ only in where the engine comes
from; every route asks for a session the same way, naming its module.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from reference_impl.errors import UsageError

#: Seconds an SQLite connection waits on a locked database before failing;
#: the environment variable ``MEMBENCH_SQLITE_BUSY_TIMEOUT_S`` overrides it
#: (tests of lock contention lower it so they need not wait 5 s).
SQLITE_BUSY_TIMEOUT_S = 5.0

#: Named pool sizings; a number N is also a sizing (N connections, no overflow).
POOL_SIZINGS = ("sqlalchemy", "prisma")
#: What SQLAlchemy's queue pool holds when given no sizes.
SQLALCHEMY_POOL = {"pool_size": 5, "max_overflow": 10}


def prisma_pool_size() -> int:
    """Prisma's default connection limit: physical CPUs x 2 + 1."""
    import psutil

    return (psutil.cpu_count(logical=False) or os.cpu_count() or 1) * 2 + 1


def pool_options(sizing: str) -> dict[str, int]:
    """Pool keywords of ``create_async_engine`` for a sizing.

    ``sqlalchemy`` keeps its default (5 connections and 10 more on demand);
    ``prisma`` caps the pool as Prisma did; a number N caps it at N.
    """
    if sizing == "sqlalchemy":
        return {}
    if sizing == "prisma":
        return {"pool_size": prisma_pool_size(), "max_overflow": 0}
    if sizing.isdigit() and int(sizing) > 0:
        return {"pool_size": int(sizing), "max_overflow": 0}
    raise UsageError(
        f"pool sizing {sizing!r} is not a positive number nor one of "
        f"{', '.join(POOL_SIZINGS)}"
    )


@dataclass
class EngineStats:
    """Engines and connections made by one app, counted through SQLAlchemy events."""

    engines_created: int = 0
    engines_disposed: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    engines_by_module: Counter[str] = field(default_factory=Counter)
    #: The database's kind (``sqlite``, ``postgresql``) and how pools are sized.
    dialect: str = ""
    pool: dict[str, object] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _count(self, attr: str) -> None:
        # Pool events fire on aiosqlite's worker threads as well as the loop's.
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)

    def as_json(self) -> dict[str, object]:
        return {
            "enginesCreated": self.engines_created,
            "enginesDisposed": self.engines_disposed,
            "connectionsOpened": self.connections_opened,
            "connectionsClosed": self.connections_closed,
            "connectionsOpen": self.connections_opened - self.connections_closed,
            "enginesByModule": dict(self.engines_by_module),
            "dialect": self.dialect,
            "pool": dict(self.pool),
        }


def make_engine(url: str, stats: EngineStats, **kwargs: object) -> AsyncEngine:
    """The one place engines are built, so both forms configure them alike."""
    if url.startswith("sqlite"):
        timeout_s = float(
            os.environ.get("MEMBENCH_SQLITE_BUSY_TIMEOUT_S", SQLITE_BUSY_TIMEOUT_S)
        )
        kwargs.setdefault("connect_args", {"timeout": timeout_s})
    engine = create_async_engine(url, **kwargs)
    stats._count("engines_created")
    sync = engine.sync_engine

    @event.listens_for(sync, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        stats._count("connections_opened")
        if url.startswith("sqlite"):
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    @event.listens_for(sync.pool, "close")
    def _on_close(_dbapi_conn, _record) -> None:
        stats._count("connections_closed")

    return engine


class PerRequestEngine:
    """Naive: a new engine for each API module and request, disposed after it."""

    def __init__(self, url: str, stats: EngineStats, **options: object) -> None:
        self.url = url
        self.stats = stats
        self.options = options

    async def start(self) -> None:
        """Nothing lives across requests in this form."""

    async def stop(self) -> None:
        """Nothing lives across requests in this form."""

    @asynccontextmanager
    async def session(self, module: str) -> AsyncIterator[AsyncSession]:
        engine = make_engine(self.url, self.stats, **self.options)
        self.stats.engines_by_module[module] += 1
        try:
            # The "$connect()" of the original: open a connection up front.
            async with (
                engine.connect() as conn,
                AsyncSession(bind=conn, expire_on_commit=False) as session,
            ):
                yield session
        finally:
            # The "$disconnect()": close the pool and every connection in it.
            await engine.dispose()
            self.stats._count("engines_disposed")


class SharedEngine:
    """Optimized: one engine per process, owned by the app's lifespan."""

    def __init__(self, url: str, stats: EngineStats, **options: object) -> None:
        self.url = url
        self.stats = stats
        self.options = options
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    async def start(self) -> None:
        self._engine = make_engine(self.url, self.stats, **self.options)
        self.stats.engines_by_module["app"] += 1
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)

    async def stop(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self.stats._count("engines_disposed")
            self._engine = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("the shared engine is used before the app started")
        return self._engine

    @asynccontextmanager
    async def session(self, module: str) -> AsyncIterator[AsyncSession]:
        assert self._sessions is not None, "the app has not started"
        async with self._sessions() as session:
            yield session


Database = PerRequestEngine | SharedEngine


def database_for(
    naive: bool, url: str, stats: EngineStats, pool: str = "sqlalchemy"
) -> Database:
    options = pool_options(pool)
    stats.dialect = make_url(url).get_backend_name()
    stats.pool.update(
        sizing=pool,
        poolSize=options.get("pool_size", SQLALCHEMY_POOL["pool_size"]),
        maxOverflow=options.get("max_overflow", SQLALCHEMY_POOL["max_overflow"]),
    )
    kind = PerRequestEngine if naive else SharedEngine
    return kind(url, stats, **options)
