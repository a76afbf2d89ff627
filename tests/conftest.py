"""Fixtures shared by the test modules: a built ``ci`` dataset, in-process
apps and real server processes on free loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from benchmarks.serverproc import ServerProcess, free_port, serve_args
from reference_impl.config import Settings
from reference_impl.server import dataset_locations


@pytest.fixture(scope="session")
def ci_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``ci`` dataset built once per test session; treat it as read-only."""
    from reference_impl import datagen

    out = tmp_path_factory.mktemp("datasets") / "ci"
    datagen.build(preset="ci", out=out)
    return out


@pytest.fixture
def fresh_dataset(ci_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the ``ci`` dataset that a test may write to."""
    copy = tmp_path / "dataset"
    shutil.copytree(ci_dataset, copy)
    return copy


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    def make(dataset: Path, variant: str = "optimized", **kwargs: object) -> Settings:
        db_url, storage = dataset_locations(dataset)
        kwargs.setdefault("db_url", db_url)
        kwargs.setdefault("storage_dir", storage)
        return Settings.for_variant(variant, **kwargs)

    return make


@pytest.fixture
def serve_app(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start ``membench serve`` processes; each is stopped after the test."""
    with ExitStack() as stack:

        def start(
            variant: str = "optimized", *, dataset: Path, naive=(), **kwargs
        ) -> str:
            port = free_port()
            log_path = tmp_path / f"server-{port}.log"
            command = serve_args(
                variant, port=port, naive=naive, dataset=dataset, **kwargs
            )
            server = stack.enter_context(
                ServerProcess(command, port=port, log_path=log_path)
            )
            return server.base_url

        yield start
