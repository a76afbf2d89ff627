"""Benchmarks of the instrument itself: what the RSS sampler costs, how often
it really samples, and how close its peak comes to the kernel's VmHWM.

    python -m benchmarks.instrument_bench [--seconds S] [--out DIR]

Three measurements, each against a small target process whose memory this
module controls:

``interval``
    the sampler process at a nominal 1, 5 and 10 ms on an idle target and on
    a target that allocates and frees in a loop (a busy heap, as a server
    under load has): the achieved mean and p99 interval, the samples, and
    the sampler's own CPU time as a fraction of one core. For comparison,
    memory_profiler's ``memory_usage(proc=pid, interval=0.01)`` on the same
    target, when it is installed (its CPU is this process's CPU time over
    the call).
``disturbance``
    how much work a CPU-bound target gets done per second with no sampler
    and with the sampler at 10 ms beside it: the share of the target's
    throughput the sampler costs. On a machine with other work running the
    figure is noisy; each arm runs ``--rounds`` times, interleaved.
``peak``
    a target that allocates 1, 8 or 32 MiB, holds it 0, 5 or 20 ms, frees
    it and rests 100 ms, ten times: how many spikes the samples show, and
    the sampled peak over VmHWM. A spike shorter than the interval can fall
    between two samples; VmHWM, read from ``/proc/PID/status`` after the
    run, never misses it, which is why run.json reports both.

Results print as a table and land in ``DIR/instrument.json`` (default
``results/instrument``). These are measurements, not tests: nothing here
passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.environment import describe
from benchmarks.sampler import SamplerProcess, hwm_mib
from benchmarks.serverproc import die_with_parent

#: An idle target: sleeps until stdin closes.
IDLE = "import sys; sys.stdin.read()"

#: A busy heap: allocates and frees blocks of 0.1-4 MiB until stdin closes.
CHURN = textwrap.dedent(
    """
    import random, sys, threading
    stop = []
    threading.Thread(target=lambda: (sys.stdin.read(), stop.append(1)),
                     daemon=True).start()
    rng = random.Random(1)
    held = []
    while not stop:
        held.append(bytearray(rng.randint(100_000, 4_000_000)))
        if len(held) > 30:
            held.pop(rng.randrange(len(held)))
    """
)

#: CPU-bound work: after a line on stdin, prints how many loop rounds it did
#: per second over argv[1] seconds.
SPIN = textwrap.dedent(
    """
    import sys, time
    sys.stdin.readline()
    end = time.perf_counter() + float(sys.argv[1])
    rounds = 0
    while time.perf_counter() < end:
        for _ in range(1000):
            pass
        rounds += 1
    print(rounds / float(sys.argv[1]), flush=True)
    """
)

#: Spikes: holds argv[3] MiB for argv[1] ms, frees it, rests 100 ms; argv[2]
#: times. The block is filled by one memset; on this kind of machine a page
#: fault costs a few microseconds, so 1 MiB is resident within ~2 ms and
#: 32 MiB within ~50 ms.
SPIKES = textwrap.dedent(
    """
    import sys, time
    hold_s = float(sys.argv[1]) / 1000
    size = int(sys.argv[3]) * 1024 * 1024
    for _ in range(int(sys.argv[2])):
        block = b"\\x01" * size
        time.sleep(hold_s)
        del block
        time.sleep(0.1)
    print("done", flush=True)
    sys.stdin.read()
    """
)
#: Every block goes to its own mapping and back to the kernel when freed
#: (glibc's dynamic threshold would otherwise keep later blocks on the heap).
SPIKE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _target(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        preexec_fn=die_with_parent,
    )


def _end(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def _sample(pid: int, seconds: float, interval_ms: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        sampler = SamplerProcess(
            pid, Path(tmp), t0=time.monotonic(), interval_ms=interval_ms
        ).start()
        time.sleep(seconds)
        summary = sampler.stop() or {}
    return {
        "nominal_ms": interval_ms,
        "interval_ms": summary.get("interval_ms"),
        "interval_p99_ms": summary.get("interval_p99_ms"),
        "samples": summary.get("samples"),
        "cpu_fraction": summary.get("cpu_fraction"),
        "peak_mib": summary.get("peak_mib"),
    }


def _memory_profiler(pid: int, seconds: float) -> dict[str, Any] | None:
    try:
        from memory_profiler import memory_usage
    except ImportError:
        return None
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    values = memory_usage(proc=pid, interval=0.01, timeout=seconds)
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return {
        "nominal_ms": 10.0,
        "interval_ms": round(wall / max(1, len(values)) * 1000, 3),
        "samples": len(values),
        "cpu_fraction": round(cpu / wall, 4),
        "peak_mib": round(max(values), 3) if values else None,
    }


def bench_interval(seconds: float) -> list[dict[str, Any]]:
    rows = []
    for target_name, script in (("idle", IDLE), ("churn", CHURN)):
        for interval_ms in (10.0, 5.0, 1.0):
            proc = _target(script)
            try:
                time.sleep(0.2)
                row = _sample(proc.pid, seconds, interval_ms)
            finally:
                _end(proc)
            rows.append({"target": target_name, "sampler": "membench", **row})
        proc = _target(script)
        try:
            time.sleep(0.2)
            row = _memory_profiler(proc.pid, seconds)
        finally:
            _end(proc)
        if row is not None:
            rows.append({"target": target_name, "sampler": "memory_profiler", **row})
    return rows


def _spin(seconds: float, interval_ms: float | None) -> float:
    proc = _target(SPIN, str(seconds))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sampler = None
            if interval_ms is not None:
                sampler = SamplerProcess(
                    proc.pid, Path(tmp), t0=time.monotonic(), interval_ms=interval_ms
                ).start()
            # The target starts counting once the sampler (if any) samples.
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            rate = float(proc.stdout.readline())
            if sampler is not None:
                sampler.stop()
    finally:
        _end(proc)
    return rate


def bench_disturbance(seconds: float, rounds: int) -> dict[str, Any]:
    without, with_sampler = [], []
    for _ in range(rounds):
        without.append(_spin(seconds, None))
        with_sampler.append(_spin(seconds, 10.0))
    base = statistics.median(without)
    sampled = statistics.median(with_sampler)
    return {
        "rounds": rounds,
        "seconds": seconds,
        "rate_without": round(base, 1),
        "rate_with_sampler": round(sampled, 1),
        "cost_fraction": round(1 - sampled / base, 4) if base else None,
    }


def _rising_edges(values: list[float], threshold: float) -> int:
    edges = 0
    above = False
    for value in values:
        if value > threshold and not above:
            edges += 1
        above = value > threshold
    return edges


def bench_peak(repeats: int = 10) -> list[dict[str, Any]]:
    rows = []
    for size_mib in (1, 8, 32):
        for hold_ms in (0.0, 5.0, 20.0):
            proc = _target(
                SPIKES, str(hold_ms), str(repeats), str(size_mib), env=SPIKE_ENV
            )
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    sampler = SamplerProcess(
                        proc.pid, Path(tmp), t0=time.monotonic(), interval_ms=10.0
                    ).start()
                    proc.stdout.readline()
                    hwm = hwm_mib(proc.pid)
                    summary = sampler.stop() or {}
                    with (Path(tmp) / "rss.csv").open() as fh:
                        next(fh)
                        values = [float(line.split(",")[1]) for line in fh]
            finally:
                _end(proc)
            floor = statistics.median(values) if values else 0.0
            peak = summary.get("peak_mib")
            rows.append(
                {
                    "spike_mib": size_mib,
                    "hold_ms": hold_ms,
                    "spikes": repeats,
                    "spikes_seen": _rising_edges(values, floor + size_mib / 2),
                    "sampled_peak_mib": peak,
                    "hwm_mib": round(hwm, 3) if hwm is not None else None,
                    "peak_over_hwm": round(peak / hwm, 4) if peak and hwm else None,
                }
            )
    return rows


def _print(results: dict[str, Any]) -> None:
    print("sampler interval and cost")
    print(
        f"  {'target':<6} {'sampler':<16} {'nominal':>8} {'achieved':>9} "
        f"{'p99':>7} {'samples':>8} {'cpu':>7}"
    )
    for row in results["interval"]:
        p99 = row.get("interval_p99_ms")
        print(
            f"  {row['target']:<6} {row['sampler']:<16} {row['nominal_ms']:>6.1f}ms "
            f"{row['interval_ms'] or 0:>7.2f}ms "
            f"{'-' if p99 is None else f'{p99:.1f}':>7} {row['samples']:>8} "
            f"{100 * (row['cpu_fraction'] or 0):>6.2f}%"
        )
    d = results["disturbance"]
    print(
        f"\nCPU-bound target: {d['rate_without']} rounds/s alone, "
        f"{d['rate_with_sampler']} with the sampler at 10 ms "
        f"({100 * (d['cost_fraction'] or 0):.2f}% less; median of {d['rounds']})"
    )
    print("\nshort spikes: how many the sampler saw, and its peak against VmHWM")
    for row in results["peak"]:
        print(
            f"  {row['spike_mib']:>3} MiB held {row['hold_ms']:>4.0f} ms: "
            f"seen {row['spikes_seen']}/{row['spikes']}, "
            f"sampled {row['sampled_peak_mib']} MiB, VmHWM {row['hwm_mib']} MiB, "
            f"ratio {row['peak_over_hwm']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instrument_bench",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="disturbance rounds")
    parser.add_argument("--out", type=Path, default=Path("results/instrument"))
    args = parser.parse_args(argv)
    results = {
        "interval": bench_interval(args.seconds),
        "disturbance": bench_disturbance(args.seconds, args.rounds),
        "peak": bench_peak(),
        "load_average": os.getloadavg(),
        "environment": describe(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instrument.json").write_text(json.dumps(results, indent=2) + "\n")
    _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
