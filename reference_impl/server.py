"""Serve the clinic API under uvicorn.

``--variant`` sets every pattern; ``--naive client,upload`` on top of
``--variant optimized`` makes only those patterns naive. Without
``--dataset`` or ``--db`` the ``ci`` dataset is served, built first when
missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from reference_impl.config import DEFAULT_AI_URL, Settings, parse_patterns
from reference_impl.errors import UsageError
from reference_impl.presets import default_dataset_dir

log = logging.getLogger("reference_impl")


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path.resolve()}"


def read_manifest(dataset: Path) -> dict:
    path = dataset / "manifest.json"
    if not path.is_file():
        raise UsageError(
            f"{dataset} holds no manifest.json; build one with "
            f"'membench dataset build --out {dataset}'"
        )
    return json.loads(path.read_text())


def dataset_locations(dataset: Path) -> tuple[str, Path]:
    """The database URL and image folder a built dataset names."""
    manifest = read_manifest(dataset)
    db_url = manifest.get("db_url") or sqlite_url(dataset / manifest["database"])
    return db_url, dataset / manifest["images"]


def settings_from_args(args: argparse.Namespace) -> Settings:
    dataset = Path(args.dataset) if args.dataset else None
    if dataset is None and not args.db:
        dataset = default_dataset_dir("ci")
        if not (dataset / "manifest.json").is_file():
            from reference_impl import datagen

            log.info("building the ci dataset in %s first", dataset)
            datagen.build(preset="ci", out=dataset)
    db_url, storage = (None, None)
    if dataset is not None:
        db_url, storage = dataset_locations(dataset)
    db_url = args.db or db_url
    storage = Path(args.storage) if args.storage else storage
    if storage is None:
        raise UsageError("--db without --dataset needs --storage DIR for image files")
    return Settings.for_variant(
        args.variant,
        naive=parse_patterns(args.naive),
        db_url=db_url,
        storage_dir=storage,
        ai_url=args.ai_url,
        ai_timeout_s=args.ai_timeout,
        pool_size=args.pool_size,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        choices=("naive", "optimized", "optimized-plus"),
        default="optimized",
    )
    parser.add_argument("--naive", metavar="PATTERN,...", help="patterns to keep naive")
    parser.add_argument("--dataset", metavar="DIR", help="a built dataset folder")
    parser.add_argument("--db", metavar="URL", help="an async SQLAlchemy URL")
    parser.add_argument("--storage", metavar="DIR", help="folder for image files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--ai-url", default=DEFAULT_AI_URL, help="base URL of the AI API"
    )
    parser.add_argument(
        "--ai-timeout", type=float, default=30.0, help="seconds to wait for the AI API"
    )
    parser.add_argument(
        "--pool-size",
        default=os.environ.get("MEMBENCH_POOL_SIZE", "sqlalchemy"),
        metavar="SIZING",
        help="database pool: sqlalchemy (5 + 10 overflow), prisma (physical CPUs"
        " x 2 + 1, no overflow) or a number N (no overflow); default: "
        "$MEMBENCH_POOL_SIZE, else sqlalchemy",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from reference_impl.app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=args.access_log,
        lifespan="on",
    )
    return 0
