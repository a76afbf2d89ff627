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

SHORT = {"requests": 500, "warmup": 100}


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
        assert data["requests"]["ok"] == 500
        assert data["requests"]["failed"] == 0
        assert data["leftover_processes"] == 0
        assert data["trend"]["rss_mib_per_1k_requests"] is not None
    assert naive_client.data["label"] == "optimized+naive-client"
    trend = optimized.data["trend"]
    assert trend["threads_last"] <= trend["threads_first"] + 4
    assert trend["open_files_last"] <= trend["open_files_first"] + 8
    # One engine and a pool of a few connections, against an engine and a
    # connection for every request (warm-up included).
    db = optimized.data["database"]
    assert db["enginesCreated"] == 1
    assert db["connectionsOpened"] <= 20
    naive_db = naive_client.data["database"]
    assert naive_db["enginesCreated"] >= 600
    assert naive_db["connectionsOpened"] >= 600
    assert naive_db["enginesCreated"] == naive_db["enginesDisposed"]
