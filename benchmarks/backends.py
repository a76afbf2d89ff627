"""The ``client`` scenario on SQLite and on PostgreSQL, side by side.

On SQLite a connection is a file handle and a thread in the app; on
PostgreSQL it is also a server process with memory of its own, which the
app's RSS does not show. ``measure_client`` runs the scenario's naive and
optimized forms on both, the optimized form once per pool sizing, and
``client_rows`` lines up what each run cost: the app's throughput, p99 and
RSS, and on PostgreSQL the server's connections at once and the summed RSS
of their backends (sampled by :mod:`benchmarks.pgstats`).

From a notebook::

    from benchmarks import backends
    url = backends.reachable_pg_url()       # None: no server, SQLite only
    runs = backends.measure_client("ci", out="results/client", pg_url=url)
    rows = backends.client_rows(runs)       # one dict per run
    print(backends.markdown(rows))
    backends.write(rows, "results/client")  # client-side-by-side.json and .md

PostgreSQL runs serve a database ``membench_<preset>`` on the server the URL
names, created and loaded the first time (the role needs CREATEDB), and
described by a dataset folder ``<out>/datasets/<preset>-pg``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.pgstats import asyncpg_dsn

log = logging.getLogger("benchmarks")

#: Where the suite looks for a PostgreSQL server when ``MEMBENCH_PG_URL`` is
#: unset: the port ``.ci/postgres.sh start`` prefers.
DEFAULT_PG_URL = "postgresql+asyncpg://membench:membench@127.0.0.1:55432/membench"
#: Pool sizings the optimized form is measured with (see ``membench serve``).
POOL_SIZINGS = ("sqlalchemy", "prisma")


def _run_sql(url: str, sql: str) -> list[Any]:
    import asyncio

    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def reachable_pg_url(url: str | None = None) -> str | None:
    """``url`` (else ``$MEMBENCH_PG_URL``, else the default) if a server answers."""
    url = url or os.environ.get("MEMBENCH_PG_URL", DEFAULT_PG_URL)
    try:
        _run_sql(url, "SELECT 1")
    except Exception as exc:
        log.info("no PostgreSQL server answers at %s: %s", url.split("@")[-1], exc)
        return None
    return url


def database_url(url: str, database: str) -> str:
    """The same server and role as ``url``, another database."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


def pg_dataset(preset: str, url: str, out: Path) -> Path:
    """A dataset folder whose rows live in ``membench_<preset>`` on ``url``'s
    server; built (database created) when missing or not the preset's."""
    from reference_impl import datagen

    name = f"membench_{preset}"
    target = database_url(url, name)
    folder = Path(out) / "datasets" / f"{preset}-pg"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("db_url") == target and _holds(target, manifest):
            return folder
    exists = _run_sql(url, f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
    if not exists:
        _run_sql(url, f"CREATE DATABASE {name}")
    log.info("loading the %s dataset into %s", preset, name)
    datagen.build(preset=preset, out=folder, db_url=target)
    return folder


def _holds(url: str, manifest: dict[str, Any]) -> bool:
    """Whether the database still holds the manifest's patients and images."""
    try:
        rows = _run_sql(
            url,
            "SELECT (SELECT count(*) FROM patients) AS patients,"
            " (SELECT count(*) FROM radiology_images) AS images",
        )
    except Exception:
        return False
    counts = manifest["counts"]
    return (rows[0]["patients"], rows[0]["images"]) == (
        counts["patients"],
        counts["images"],
    )


def measure_client(
    preset: str,
    out: str | Path,
    *,
    pg_url: str | None = None,
    repeat: int = 1,
    pool_sizings: Sequence[str] = POOL_SIZINGS,
    overrides: dict[str, Any] | None = None,
) -> list[Any]:
    """Run ``client`` naive and optimized on SQLite and, with ``pg_url``, on
    PostgreSQL; the optimized form once per pool sizing. Runs land in
    ``out/<backend>-<form>/``; the harness's results, in the order run."""
    from benchmarks import runner

    out = Path(out)
    backends: list[tuple[str, str | None, Path | None]] = [("sqlite", None, None)]
    if pg_url is not None:
        dataset = pg_dataset(preset, pg_url, out)
        db = json.loads((dataset / "manifest.json").read_text())["db_url"]
        backends.append(("postgresql", db, dataset))
    results: list[Any] = []
    for backend, db, dataset in backends:
        forms = [("naive", "sqlalchemy")]
        forms += [("optimized", sizing) for sizing in pool_sizings]
        for variant, sizing in forms:
            name = f"{backend}-naive" if variant == "naive" else None
            folder = out / (name or f"{backend}-optimized-pool-{sizing}")
            results += runner.run_scenario(
                "client",
                variant,
                preset,
                out=folder,
                repeat=repeat,
                overrides=dict(overrides or {}),
                dataset=dataset,
                db=db,
                pool_size=sizing,
            )
    return results


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def client_rows(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per run: the backend, the form, and what the run cost."""
    rows = []
    for run in runs:
        data = run if isinstance(run, dict) else run.data
        server = data.get("db_server") or {}
        database = data.get("database") or {}
        pool = database.get("pool") or {}
        rows.append(
            {
                "run_dir": str(run.path) if hasattr(run, "path") else None,
                "backend": database.get("dialect", "?"),
                "variant": data["variant"],
                "pool": "per request"
                if data["variant"] == "naive"
                else pool.get("sizing", "?")
                + f" ({pool.get('poolSize')}+{pool.get('maxOverflow')})",
                "repeat": data["repeat"],
                "requests_ok": data["requests"]["ok"],
                "throughput_rps": data["throughput_rps"],
                "p99_ms": data["latency_ms"]["p99"],
                "app_rss_peak_mib": data["rss_mib"]["peak"],
                "app_rss_growth_mib": data["rss_mib"]["growth"],
                "app_threads_max": _get(data, "process", "threads_max"),
                "app_open_files_max": _get(data, "process", "open_files_max"),
                "connections_opened": database.get("connectionsOpened"),
                "server_connections_max": server.get("connections_max"),
                "server_backends_rss_mib_peak": server.get("backends_rss_mib_peak"),
                "server_backends_anon_mib_peak": server.get("backends_anon_mib_peak"),
                "server_rss_mib_peak": server.get("server_rss_mib_peak"),
                "app_plus_backends_mib_peak": _sum(
                    data["rss_mib"]["peak"], server.get("backends_rss_mib_peak")
                ),
            }
        )
    return rows


def _sum(a: float | None, b: float | None) -> float | None:
    if a is None:
        return None
    return round(a + (b or 0.0), 1)


#: Columns of ``markdown``: (key, heading).
COLUMNS = (
    ("backend", "database"),
    ("variant", "form"),
    ("pool", "pool"),
    ("throughput_rps", "req/s"),
    ("p99_ms", "p99 ms"),
    ("app_rss_peak_mib", "app peak MiB"),
    ("connections_opened", "connections opened"),
    ("server_connections_max", "server connections max"),
    ("server_backends_rss_mib_peak", "backends RSS MiB"),
    ("server_rss_mib_peak", "server RSS MiB"),
)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table ("-" where a figure does not apply)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    lines = [
        "| " + " | ".join(head for _, head in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell(row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """``client-side-by-side.json`` and ``.md`` in ``out``; the JSON's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "client-side-by-side.json"
    path.write_text(json.dumps(list(rows), indent=2) + "\n")
    (out / "client-side-by-side.md").write_text(markdown(rows) + "\n")
    return path
