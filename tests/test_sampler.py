"""The RSS sampler against small processes whose memory the test controls."""

from __future__ import annotations

import contextlib
import csv
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from benchmarks.sampler import Sampler, SamplerConfig, SamplerProcess, children_of
from benchmarks.serverproc import die_with_parent

MIB = 1024 * 1024

#: A process that holds ``argv[1]`` MiB for a moment, frees it, then waits
#: for a line on stdin (or exits at once with ``exit`` as argv[2]).
HOLDER = textwrap.dedent(
    """
    import sys, time
    size = int(sys.argv[1]) * 1024 * 1024
    block = bytearray(size)
    for i in range(0, size, 4096):
        block[i] = 1
    print("held", flush=True)
    time.sleep(0.3)
    del block
    print("freed", flush=True)
    if len(sys.argv) > 2 and sys.argv[2] == "exit":
        sys.exit(3)
    sys.stdin.readline()
    """
)

#: A parent that starts a child holding ``argv[1]`` MiB, then waits on stdin.
PARENT = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; b = bytearray(int(sys.argv[1]) * 2**20);"
         "[b.__setitem__(i, 1) for i in range(0, len(b), 4096)];"
         "print('held', flush=True); sys.stdin.readline()",
         sys.argv[1]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    child.stdout.readline()
    print("held", flush=True)
    sys.stdin.readline()
    child.stdin.close()
    child.wait()
    """
)


def _start(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )


def _finish(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.stdin.write(b"\n")
            proc.stdin.flush()
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_sampled_peak_agrees_with_vmhwm(tmp_path: Path) -> None:
    proc = _start(HOLDER, "200")
    try:
        sampler = SamplerProcess(proc.pid, tmp_path, t0=time.monotonic()).start()
        assert proc.stdout.readline().strip() == b"held"
        assert proc.stdout.readline().strip() == b"freed"
        with open(f"/proc/{proc.pid}/status") as fh:
            hwm_kib = next(int(x.split()[1]) for x in fh if x.startswith("VmHWM:"))
        summary = sampler.stop()
    finally:
        _finish(proc)
    assert summary is not None
    hwm = hwm_kib / 1024
    assert summary["samples"] > 10
    # The sampler saw the 200 MiB block: its peak is within 5% of the kernel's
    # own peak. The kernel batches its RSS counters per CPU, so a sample may
    # read a little (well under 1 MiB) above VmHWM.
    assert summary["peak_mib"] > 200
    assert hwm >= summary["peak_mib"] - 1.0
    assert summary["peak_mib"] >= 0.95 * hwm
    assert summary["cpu_s"] >= 0
    rows = _read_csv(tmp_path / "rss.csv")
    assert len(rows) == summary["samples"]
    assert list(rows[0]) == ["t_s", "rss_mib"]
    times = [float(r["t_s"]) for r in rows]
    assert times == sorted(times)
    proc_rows = _read_csv(tmp_path / "proc.csv")
    assert proc_rows and int(proc_rows[0]["threads"]) >= 1
    assert int(proc_rows[0]["open_files"]) >= 3


def test_a_process_that_dies_keeps_its_samples(tmp_path: Path) -> None:
    proc = _start(HOLDER, "50", "exit")
    try:
        sampler = SamplerProcess(proc.pid, tmp_path, t0=time.monotonic()).start()
        proc.wait(timeout=30)
        # The sampler stops by itself once the process is gone.
        sampler.proc.wait(timeout=30)
        summary = sampler.stop()
    finally:
        _finish(proc)
    assert proc.returncode == 3
    assert summary is not None
    assert summary["died_at_s"] is not None
    assert summary["peak_mib"] > 50
    assert len(_read_csv(tmp_path / "rss.csv")) == summary["samples"] > 0


def test_the_watchdog_kills_above_the_limit(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "300"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        sampler = SamplerProcess(
            proc.pid, tmp_path, t0=time.monotonic(), limit_mib=150
        ).start()
        proc.wait(timeout=30)
        summary = sampler.stop()
    finally:
        _finish(proc)
    assert proc.returncode == -9
    assert summary["killed_at_rss_mib"] > 150
    assert summary["died_at_s"] is not None


def test_children_are_counted(tmp_path: Path) -> None:
    proc = _start(PARENT, "120")
    try:
        assert proc.stdout.readline().strip() == b"held"
        assert len(children_of(proc.pid)) == 1
        sampler = Sampler(
            SamplerConfig(pid=proc.pid, t0=time.monotonic(), proc_interval_ms=5)
        )
        for _ in range(3):
            sampler._slow_tick(0.0, 0.0)
        stop_at = time.monotonic() + 0.2

        def stop_soon() -> None:
            while time.monotonic() < stop_at:
                time.sleep(0.01)
            sampler.stop()

        threading.Thread(target=stop_soon).start()
        sampler.run()
    finally:
        _finish(proc)
    assert sampler.max_children == 1
    # The parent alone holds ~10 MiB; with its child, over 120 MiB.
    assert max(sampler.rss_mib) > 120


def test_the_sampler_refuses_a_missing_process(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    with pytest.raises(RuntimeError, match="did not start"):
        SamplerProcess(dead_pid, tmp_path, t0=time.monotonic()).start()
