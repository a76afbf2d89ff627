"""``membench run``: run files, ratios, crashes, caps, interruptions, and no
process left behind. Every run here is a real server at the ``ci`` preset."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import runner, summary
from benchmarks.harness import Options, RunSpec
from benchmarks.serverproc import RUN_MARKER_ENV, membench_command
from reference_impl.errors import UsageError
from reference_impl.presets import load_preset

#: The keys INTERFACE.md requires of every run.json, with their sub-keys.
REQUIRED = {
    "scenario": None,
    "variant": None,
    "naive_patterns": None,
    "preset": None,
    "repeat": None,
    "load": {"requests", "concurrency"},
    "rss_mib": {"baseline", "peak", "end", "hwm"},
    "requests": {"ok", "failed", "by_status"},
    "latency_ms": {"p50", "p95", "p99", "max"},
    "throughput_rps": None,
    "duration_s": None,
    "sampler": {"interval_ms", "samples"},
    "environment": {"python", "platform", "cpus", "memory_mib", "packages"},
}


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rpartition(b")")[2].split()[0]
    except OSError:
        return False
    return state != b"Z"


def _assert_nothing_left(data: dict) -> None:
    assert data["leftover_processes"] == 0
    for name, pid in data["pids"].items():
        assert not _alive(pid), f"the {name} (pid {pid}) outlived its run"


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.integration
def test_listing_naive_against_optimized(ci_dataset: Path, tmp_path: Path) -> None:
    results = runner.run_scenario(
        "listing", "naive,optimized", "ci", out=tmp_path, dataset=ci_dataset
    )
    assert [r["variant"] for r in results] == ["naive", "optimized"]
    for result in results:
        data = result.data
        for key, subkeys in REQUIRED.items():
            assert key in data, key
            if subkeys:
                assert subkeys <= set(data[key]), (key, subkeys - set(data[key]))
        assert data["environment"]["allocator"]["MALLOC_ARENA_MAX"] is None
        assert data["crashed"] is False
        assert data["requests"]["ok"] == data["load"]["requests"] == 40
        assert data["requests"]["failed"] == 0
        assert data["requests"]["by_status"] == {"200": 40}
        rss = data["rss_mib"]
        # VmHWM is the kernel's peak; its per-CPU counter batching lets a
        # sample read a fraction of a MiB above it.
        assert rss["hwm"] >= rss["peak"] - 1.0
        assert rss["peak"] >= rss["baseline"] > 0
        assert data["sampler"]["samples"] > 50
        latency = _csv(result.path / "latency.csv")
        assert len(latency) == 40
        assert set(latency[0]) == {"t_s", "route", "status", "latency_ms"}
        assert {row["route"] for row in latency} == {"patients"}
        rss_rows = _csv(result.path / "rss.csv")
        assert len(rss_rows) == data["sampler"]["samples"]
        assert not (result.path / "scratch").exists()
        _assert_nothing_left(data)
    naive, optimized = (r.data for r in results)
    # Every patient with every image row, against a page of 20.
    assert naive["rss_mib"]["growth"] > 3 * optimized["rss_mib"]["growth"]
    assert naive["rss_mib"]["peak"] > 1.3 * optimized["rss_mib"]["peak"]
    assert (
        naive["requests"]["response_mib"] > 10 * optimized["requests"]["response_mib"]
    )
    # One engine for the optimized server; one per request for the naive one.
    assert optimized["database"]["enginesCreated"] == 1
    assert naive["database"]["enginesCreated"] >= 40
    written = json.loads((tmp_path / "summary.json").read_text())
    pair = written["scenarios"]["listing"]["ratios"]["optimized"]["peak"]
    assert pair["pairs"][0] == pytest.approx(
        naive["rss_mib"]["peak"] / optimized["rss_mib"]["peak"], abs=0.01
    )
    assert "| naive |" in (tmp_path / "summary.md").read_text()
    assert runner.load_runs(tmp_path)[0].path == results[0].path


@pytest.mark.integration
def test_a_server_killed_mid_run_is_recorded_as_crashed(
    ci_dataset: Path, tmp_path: Path
) -> None:
    timers: list[threading.Timer] = []

    def kill_during_load(phase: str, info: dict) -> None:
        if phase == "load":
            timer = threading.Timer(0.3, os.kill, (info["pid"], signal.SIGKILL))
            timers.append(timer)
            timer.start()

    [result] = runner.run_scenario(
        "client",
        "optimized",
        "ci",
        out=tmp_path,
        dataset=ci_dataset,
        overrides={"requests": 5000, "timeout_s": 60},
        on_event=kill_during_load,
    )
    for timer in timers:
        timer.join()
    data = result.data
    assert data["crashed"] is True
    assert data["exit_code"] == -signal.SIGKILL
    assert data["died_at_s"] is not None
    assert (result.path / "run.json").is_file()
    assert data["requests"]["ok"] < 5000
    assert data["requests"]["failed"] + data["requests"]["not_sent"] > 0
    assert len(_csv(result.path / "rss.csv")) == data["sampler"]["samples"] > 0
    assert data["release_mib"] is None
    _assert_nothing_left(data)


@pytest.mark.integration
def test_a_memory_cap_kills_the_naive_upload_only(
    ci_dataset: Path, tmp_path: Path
) -> None:
    results = runner.run_scenario(
        "upload",
        ["naive", "optimized"],
        "ci",
        out=tmp_path,
        dataset=ci_dataset,
        memory_limit_mib=150,
    )
    naive, optimized = (r.data for r in results)
    assert naive["memory_limit"]["mechanism"] == "watchdog"
    # Eight uploads of ~8 MiB held whole at once cross 150 MiB.
    assert naive["crashed"] is True
    assert naive["memory_limit"]["killed"] is True
    assert naive["memory_limit"]["killed_at_rss_mib"] > 150
    assert naive["requests"]["ok"] < naive["load"]["requests"]
    # Streamed to disk, the same uploads stay far below the cap.
    assert optimized["crashed"] is False
    assert optimized["memory_limit"]["killed"] is False
    assert optimized["requests"]["ok"] == optimized["load"]["requests"]
    for data in (naive, optimized):
        assert data["memory_limit_mib"] == 150
        _assert_nothing_left(data)


@pytest.mark.integration
def test_ctrl_c_stops_everything_and_keeps_the_run(
    ci_dataset: Path, tmp_path: Path
) -> None:
    command = membench_command(
        "run",
        "client",
        "--variant",
        "optimized",
        "--preset",
        "ci",
        "--dataset",
        str(ci_dataset),
        "--out",
        str(tmp_path),
        "--requests",
        "20000",
    )
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "] load:" in line:
                proc.send_signal(signal.SIGINT)
                break
        proc.stderr.read()
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    [run_json] = tmp_path.rglob("run.json")
    data = json.loads(run_json.read_text())
    assert data["interrupted"] is True
    assert data["crashed"] is False
    assert data["requests"]["not_sent"] > 0
    _assert_nothing_left(data)


def test_variants_are_interleaved() -> None:
    specs = runner.interleave(["listing"], ["naive", "optimized"], ("client",), 3)
    assert [(s.variant, s.repeat) for s in specs] == [
        ("naive", 1),
        ("optimized", 1),
        ("naive", 2),
        ("optimized", 2),
        ("naive", 3),
        ("optimized", 3),
    ]
    assert specs[0].naive == ()
    assert specs[1].label == "optimized+naive-client"
    assert RunSpec("upload", "naive").label == "naive"


def test_labels_name_what_sets_runs_apart(tmp_path: Path) -> None:
    options = Options(
        preset=load_preset("ci"),
        out=tmp_path,
        dataset=tmp_path,
        malloc_arena_max=2,
        memory_limit_mib=1024,
    )
    assert options.label_suffix() == "+arena-2+cap-1024"
    assert options.server_env("m") == {RUN_MARKER_ENV: "m", "MALLOC_ARENA_MAX": "2"}
    pinned = Options(
        preset=load_preset("ci"),
        out=tmp_path,
        dataset=tmp_path,
        malloc_mmap_threshold=131072,
    )
    assert pinned.label_suffix() == "+mmap-131072"
    assert pinned.server_env("m")["MALLOC_MMAP_THRESHOLD_"] == "131072"
    load = Options(
        preset=load_preset("ci"),
        out=tmp_path,
        dataset=tmp_path,
        overrides={"requests": 7, "weights.login": 3},
    ).load_for("clinic")
    assert load["requests"] == 7
    assert load["weights"]["login"] == 3
    assert load["weights"]["patients"] == 6


def _fake_run(label: str, repeat: int, peak: float, baseline: float, rps: float):
    return {
        "scenario": "upload",
        "variant": label,
        "label": label,
        "preset": "ci",
        "repeat": repeat,
        "rss_mib": {"baseline": baseline, "peak": peak, "end": peak, "hwm": peak},
        "requests": {"ok": 10, "failed": 0, "not_sent": 0},
        "throughput_rps": rps,
        "latency_ms": {"p99": 5.0},
        "crashed": False,
    }


def test_the_summary_pairs_runs_by_repeat() -> None:
    runs = [
        _fake_run("naive", 1, 300, 60, 10),
        _fake_run("optimized", 1, 100, 60, 20),
        _fake_run("naive", 2, 360, 60, 10),
        _fake_run("optimized", 2, 60.5, 60, 40),
    ]
    result = summary.compare(runs)["scenarios"]["upload"]
    assert result["reference"] == "naive"
    assert result["variants"]["naive"]["peak_mib"] == {
        "median": 330,
        "min": 300,
        "max": 360,
    }
    ratios = result["ratios"]["optimized"]
    assert ratios["peak"]["pairs"] == [3.0, pytest.approx(5.95, abs=0.01)]
    # A growth of 0.5 MiB is noise: no ratio is taken over it.
    assert ratios["growth"]["pairs"] == [6.0, None]
    assert ratios["growth"]["median"] == 6.0
    assert ratios["throughput"]["pairs"] == [2.0, 4.0]
    text = summary.markdown(summary.compare(runs))
    assert "| optimized | 2 | 80.2 (60.5-100.0)" in text


def test_usage_errors_name_the_value() -> None:
    with pytest.raises(UsageError, match="unknown scenario 'lsting'"):
        runner.parse_scenarios("lsting")
    with pytest.raises(UsageError, match="unknown variant 'fast'"):
        runner.parse_variants("naive,fast")
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        runner.parse_sets(["upload_mib"])
    assert runner.parse_sets(["upload_mib=4", "weights.upload=0.5", "x=a"]) == {
        "upload_mib": 4,
        "weights.upload": 0.5,
        "x": "a",
    }
    assert runner.parse_scenarios("all") == [
        "listing",
        "images",
        "client",
        "upload",
        "encoding",
        "body-limit",
        "clinic",
    ]


def test_the_cli_turns_a_mistake_into_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*membench_command("run", "nope", "--out", str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown scenario 'nope'" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_the_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reference_impl", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for option in ("--memory-limit", "--malloc-arena-max", "--repeat", "--set"):
        assert option in done.stdout
