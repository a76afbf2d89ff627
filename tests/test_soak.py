"""The ``soak`` scenario, shortened to the ``ci`` preset: what must stay flat
in the optimized server, and what the naive client pattern leaves growing.

The RSS slope over 20,000 requests is a measurement of the ``default``
preset (``membench run soak --preset default``), not a test: a few hundred
requests are too few for the allocator to settle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import runner

SHORT = {"requests": 300, "warmup": 50}


@pytest.mark.integration
@pytest.mark.slow
def test_soak_keeps_threads_and_files_flat_and_one_engine(
    ci_dataset: Path, tmp_path: Path
) -> None:
    optimized, naive_client = runner.run_scenario(
        "soak",
        "optimized",
        "ci",
        out=tmp_path,
        dataset=ci_dataset,
        overrides=SHORT,
        write_summary=False,
    ) + runner.run_scenario(
        "soak",
        "optimized",
        "ci",
        naive=("client",),
        out=tmp_path,
        dataset=ci_dataset,
        overrides=SHORT,
        write_summary=False,
    )
    for result in (optimized, naive_client):
        data = result.data
        assert data["crashed"] is False
        assert data["requests"]["ok"] == 300
        assert data["requests"]["failed"] == 0
        assert data["leftover_processes"] == 0
        assert data["trend"]["rss_mib_per_1k_requests"] is not None
    assert naive_client.data["label"] == "optimized+naive-client"
    # Pools fill in the first half (each SQLite connection is a thread and
    # three files); the second half holds no more.
    trend = optimized.data["trend"]
    for column in ("threads", "open_files"):
        first = trend[f"{column}_max_first_half"]
        assert trend[f"{column}_max_second_half"] <= first + 3, column
    # One engine whose pool reuses its connections (overflow ones come and
    # go), against an engine and a connection for every request, warm-up
    # included.
    db = optimized.data["database"]
    assert db["enginesCreated"] == 1
    naive_db = naive_client.data["database"]
    assert naive_db["enginesCreated"] >= 350
    assert naive_db["connectionsOpened"] >= 350
    assert naive_db["connectionsOpened"] > 4 * db["connectionsOpened"]
    assert naive_db["enginesCreated"] == naive_db["enginesDisposed"]
