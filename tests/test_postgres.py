"""The suite on PostgreSQL: a dataset loaded into it, every route served from
it, the naive client's connection per request seen from the server's side,
and the sampler of the server's memory.

The server is the one ``MEMBENCH_PG_URL`` names (``.ci/postgres.sh start``
prints it); each test session works in a private database of its own, created
and dropped here, so the role needs CREATEDB. Without a reachable server these
tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from ai_support import running_stub
from sqlalchemy.engine import make_url

from benchmarks import backends
from benchmarks.pgstats import (
    CSV_FIELDS,
    PgSampler,
    asyncpg_dsn,
    is_postgres,
)
from benchmarks.serverproc import membench_command
from reference_impl import imagegen
from reference_impl.errors import UsageError
from reference_impl.patterns.client import pool_options, prisma_pool_size

needs_postgres = pytest.mark.postgres

#: Read routes, with paths the dataset's second patient makes valid.
READ_ROUTES = [
    "/api/patients",
    "/api/patients?page=2&limit=5",
    "/api/patients/2",
    "/api/patients/2/images",
    "/api/invoices?limit=5",
    "/api/exchange-rate?currency=EUR",
]

#: Tables of the clinic and the manifest count each one holds.
TABLE_COUNTS = {
    "patients": "patients",
    "radiology_images": "images",
    "invoices": "invoices",
    "invoice_items": "invoice_items",
    "exchange_rates": "exchange_rates",
    "users": "users",
}


def run_sql(url: str, *statements: str) -> list:
    """Run statements on one fresh connection; the rows of the last one."""
    import asyncpg

    async def run() -> list:
        conn = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            for statement in statements[:-1]:
                await conn.execute(statement)
            return await conn.fetch(statements[-1])
        finally:
            await conn.close()

    return asyncio.run(run())


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The server's URL, once it answered; skip (fail in CI) when none does."""
    url = os.environ.get("MEMBENCH_PG_URL", backends.DEFAULT_PG_URL)
    try:
        run_sql(url, "SELECT 1")
    except Exception as exc:
        reason = (
            f"no PostgreSQL server answers at {make_url(url)!r} ({exc}); start one "
            f"with 'eval \"$(.ci/postgres.sh start)\"' or set MEMBENCH_PG_URL"
        )
        if in_ci():
            pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
        pytest.skip(reason)
    return url


@pytest.fixture(scope="session")
def pg_db(pg_url: str) -> Iterator[str]:
    """The URL of a private database, dropped when the session ends."""
    name = f"membench_test_{secrets.token_hex(4)}"
    run_sql(pg_url, f"CREATE DATABASE {name}")
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        run_sql(pg_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_dataset(pg_db: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``ci`` dataset loaded into PostgreSQL by ``membench dataset build``."""
    out = tmp_path_factory.mktemp("pg") / "ci"
    command = membench_command(
        "dataset", "build", "--preset", "ci", "--out", str(out), "--db", pg_db
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def sessions(pg_url: str, database: str) -> int:
    """Connections the server has accepted into ``database`` so far."""
    rows = run_sql(
        pg_url,
        f"SELECT sessions FROM pg_stat_database WHERE datname = '{database}'",
    )
    return rows[0]["sessions"]


def sessions_after(pg_url: str, database: str, at_least: int) -> int:
    """``sessions``, polled until it reaches ``at_least`` or 5 s pass: a backend
    reports its session when it exits, shortly after the client hung up."""
    for _ in range(100):
        count = sessions(pg_url, database)
        if count >= at_least:
            return count
        asyncio.run(asyncio.sleep(0.05))
    return count


def test_pool_sizings():
    assert pool_options("sqlalchemy") == {}
    assert pool_options("prisma") == {
        "pool_size": prisma_pool_size(),
        "max_overflow": 0,
    }
    assert prisma_pool_size() % 2 == 1
    assert pool_options("3") == {"pool_size": 3, "max_overflow": 0}
    for bad in ("0", "-2", "many"):
        with pytest.raises(UsageError, match=repr(bad)):
            pool_options(bad)


def test_postgres_urls_are_told_apart_and_made_asyncpg_dsns():
    assert is_postgres("postgresql+asyncpg://u:p@127.0.0.1:5432/db")
    assert is_postgres("postgresql+psycopg://u@h/db")
    assert not is_postgres("sqlite+aiosqlite:///clinic.db")
    assert not is_postgres(None)
    assert (
        asyncpg_dsn("postgresql+asyncpg://u:p@127.0.0.1:5432/db")
        == "postgresql://u:p@127.0.0.1:5432/db"
    )


@needs_postgres
def test_dataset_build_loads_every_row_into_postgres(pg_dataset, pg_db, ci_dataset):
    manifest = json.loads((pg_dataset / "manifest.json").read_text())
    same_seed = json.loads((ci_dataset / "manifest.json").read_text())
    assert manifest["db_url"] == pg_db
    assert manifest["counts"] == same_seed["counts"]
    for table, key in TABLE_COUNTS.items():
        rows = run_sql(pg_db, f"SELECT count(*) AS n FROM {table}")
        assert rows[0]["n"] == manifest["counts"][key], table
    assert any((pg_dataset / manifest["images"]).iterdir())


@pytest.fixture(scope="module")
def ai_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_stub(tmp_path_factory.mktemp("stub")) as url:
        yield url


@needs_postgres
@pytest.mark.integration
@pytest.mark.parametrize("variant", ["naive", "optimized"])
def test_every_route_answers_from_postgres_as_from_sqlite(
    serve_app, pg_dataset, pg_db, ci_dataset, ai_url, variant
):
    manifest = json.loads((pg_dataset / "manifest.json").read_text())
    on_pg = serve_app(variant, dataset=pg_dataset, ai_url=ai_url)
    on_sqlite = serve_app(variant, dataset=ci_dataset)
    with (
        httpx.Client(base_url=on_pg, timeout=30) as pg,
        httpx.Client(base_url=on_sqlite, timeout=30) as lite,
    ):
        for path in READ_ROUTES:
            answer = pg.get(path)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.json() == lite.get(path).json(), path
        login = pg.post("/api/auth/login", json=manifest["login"])
        assert login.status_code == 200, login.text
        refused = pg.post(
            "/api/auth/login", json={**manifest["login"], "password": "wrong"}
        )
        assert refused.status_code == 401
        diagnosis = pg.post("/api/ai/dental-diagnosis", json={"patientId": 2})
        assert diagnosis.status_code == 200, diagnosis.text
        assert diagnosis.json()["imagesAnalyzed"] >= 1
        image = imagegen.generate("bitewing", random.Random(7), scale=0.1)
        upload = pg.post(
            "/api/patients/2/images",
            files={"file": ("scan" + image.extension, image.data, image.mime_type)},
        )
        assert upload.status_code == 201, upload.text
        new_id = upload.json()["id"]
        try:
            listed = pg.get("/api/patients/2/images?limit=100").json()
            rows = listed["data"] if variant == "optimized" else listed
            assert new_id in {row["id"] for row in rows}
        finally:
            # The other variant compares this patient with SQLite again.
            run_sql(pg_db, f"DELETE FROM radiology_images WHERE id = {new_id}")


def backend_pids(pg_url: str, database: str) -> set[int]:
    """Pids of the server processes that serve a client of ``database`` now."""
    rows = run_sql(
        pg_url,
        f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}'"
        " AND usename IS NOT NULL",
    )
    return {row["pid"] for row in rows}


def send(base: str, requests: int) -> int:
    """``requests`` cheap reads one after another; connections the app opened."""
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(requests):
            response = client.get("/api/exchange-rate?currency=EUR")
            assert response.status_code == 200, response.text
        return client.get("/debug/stats").json()["database"]["connectionsOpened"]


@needs_postgres
@pytest.mark.integration
def test_the_naive_client_costs_a_server_connection_per_request(
    serve_app, pg_dataset, pg_url, pg_db
):
    database = make_url(pg_db).database
    base = serve_app("optimized", dataset=pg_dataset, naive=["client"])
    before = sessions(pg_url, database)
    requests = 12
    assert send(base, requests) == requests
    # Each connection was closed with its request: no backend stays behind.
    assert backend_pids(pg_url, database) == set()
    assert sessions_after(pg_url, database, before + requests) - before >= requests


@needs_postgres
@pytest.mark.integration
def test_the_shared_client_keeps_one_server_connection(
    serve_app, pg_dataset, pg_url, pg_db
):
    database = make_url(pg_db).database
    base = serve_app("optimized", dataset=pg_dataset)
    # Requests one at a time need one pooled connection; the same backend
    # process serves the second batch as served the first.
    assert send(base, 6) == 1
    first = backend_pids(pg_url, database)
    assert send(base, 6) == 1
    assert backend_pids(pg_url, database) == first
    assert len(first) == 1


@needs_postgres
@pytest.mark.integration
def test_a_prisma_sized_pool_caps_the_server_connections(
    serve_app, pg_dataset, pg_url, pg_db
):
    cap = prisma_pool_size()
    concurrency = cap + 3
    base = serve_app("optimized", dataset=pg_dataset, extra=["--pool-size", "prisma"])
    with (
        PgSampler(pg_db, interval_s=0.02) as sampler,
        httpx.Client(base_url=base, timeout=60) as client,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        statuses = list(
            pool.map(
                lambda _: client.get("/api/invoices?limit=20").status_code,
                range(concurrency * 6),
            )
        )
        stats = client.get("/debug/stats").json()["database"]
    assert statuses == [200] * len(statuses)
    assert stats["pool"] == {"sizing": "prisma", "poolSize": cap, "maxOverflow": 0}
    assert 1 <= stats["connectionsOpened"] <= cap
    assert sampler.summary()["connections_max"] <= cap


@needs_postgres
def test_the_sampler_counts_connections_and_their_backends_memory(pg_db, tmp_path):
    import asyncpg

    held = 3

    async def hold_connections(sampler: PgSampler) -> list[int]:
        conns = [
            await asyncpg.connect(asyncpg_dsn(pg_db), timeout=5) for _ in range(held)
        ]
        pids = [await conn.fetchval("SELECT pg_backend_pid()") for conn in conns]
        seen = len(sampler.samples)
        for _ in range(200):
            if any(s.connections == held for s in sampler.samples[seen:]):
                break
            await asyncio.sleep(0.02)
        for conn in conns:
            await conn.close()
        for _ in range(200):
            if sampler.samples[-1].connections == 0:
                break
            await asyncio.sleep(0.02)
        return pids

    with PgSampler(pg_db, interval_s=0.02) as sampler:
        pids = asyncio.run(hold_connections(sampler))
    summary = sampler.summary()
    assert summary["connections_max"] == held
    assert summary["connections_end"] == 0
    assert set(pids) <= sampler.backend_pids_seen
    busiest = max(sampler.samples, key=lambda s: s.connections)
    # An idle backend holds a few MiB of its own and more it shares.
    assert 1 < busiest.backends_rss_mib / held < 200
    assert 0 < busiest.backends_anon_mib <= busiest.backends_rss_mib
    assert busiest.server_rss_mib > busiest.backends_rss_mib
    assert busiest.server_processes >= held + 2
    assert summary["sampler"]["samples"] == len(sampler.samples)
    sampler.write_csv(tmp_path / "pg.csv")
    lines = (tmp_path / "pg.csv").read_text().splitlines()
    assert lines[0] == ",".join(CSV_FIELDS)
    assert len(lines) == len(sampler.samples) + 1


def run_data(dialect: str, variant: str, server: dict | None) -> dict:
    """The run.json keys the side-by-side table reads."""
    return {
        "variant": variant,
        "repeat": 1,
        "requests": {"ok": 100},
        "throughput_rps": 50.0,
        "latency_ms": {"p99": 120.0},
        "rss_mib": {"peak": 80.0, "growth": 12.5},
        "process": {"threads_max": 9, "open_files_max": 30},
        "database": {
            "dialect": dialect,
            "connectionsOpened": 100 if variant == "naive" else 5,
            "pool": {"sizing": "prisma", "poolSize": 5, "maxOverflow": 0},
        },
        **({"db_server": server} if server else {}),
    }


def test_the_side_by_side_rows_add_the_backends_to_the_app():
    server = {
        "connections_max": 16,
        "backends_rss_mib_peak": 200.0,
        "backends_anon_mib_peak": 40.0,
        "server_rss_mib_peak": 330.0,
    }
    runs = [
        run_data("sqlite", "naive", None),
        run_data("postgresql", "naive", server),
        run_data("postgresql", "optimized", server),
    ]
    rows = backends.client_rows(runs)
    assert [(r["backend"], r["pool"]) for r in rows] == [
        ("sqlite", "per request"),
        ("postgresql", "per request"),
        ("postgresql", "prisma (5+0)"),
    ]
    assert rows[0]["server_connections_max"] is None
    assert rows[0]["app_plus_backends_mib_peak"] == 80.0
    assert rows[1]["server_connections_max"] == 16
    assert rows[1]["app_plus_backends_mib_peak"] == 280.0
    table = backends.markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| sqlite | naive | per request | 50.0 | 120.0 |")
    assert table[3].endswith("| 16 | 200.0 | 330.0 |")


def test_an_unreachable_server_is_told_as_none():
    assert backends.reachable_pg_url("postgresql+asyncpg://u:p@127.0.0.1:1/db") is None
