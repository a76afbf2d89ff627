"""The figures of a run, computed from what it recorded, and its files.

``run_json(...)`` assembles run.json from the sampler's CSV files and
summary, the load's records and what the server answered to the probe;
``write_latency_csv`` writes one row per measured request. The statistics
(percentiles, least-squares slopes, windows of samples) are small and
written here so that every figure is traceable to its formula.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import environment, load, scenarios

if TYPE_CHECKING:
    from benchmarks.harness import Options, RunSpec, _Phases

MIB = 1024 * 1024


def read_rss_csv(path: Path) -> tuple[list[float], list[float]]:
    times: list[float] = []
    values: list[float] = []
    if not path.is_file():
        return times, values
    with path.open() as fh:
        next(fh, None)
        for line in fh:
            t_s, rss = line.split(",")
            times.append(float(t_s))
            values.append(float(rss))
    return times, values


def read_proc_csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [
            {k: float(v) if v != "" else float("nan") for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def _window(
    times: Sequence[float], values: Sequence[float], start: float, end: float
) -> list[float]:
    return [v for t, v in zip(times, values, strict=True) if start <= t <= end]


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, round(q / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs; None with fewer than 3 points."""
    if len(xs) < 3:
        return None
    mean_x = statistics.fmean(xs)
    mean_y = statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def request_stats(records: Sequence[load.Record]) -> dict[str, Any]:
    """ok / failed counts, by status and by route, and the errors seen."""
    by_status: Counter[str] = Counter()
    by_route: dict[str, dict[str, Any]] = {}
    errors: Counter[str] = Counter()
    ok = failed = 0
    for record in records:
        by_status[str(record.status)] += 1
        route = by_route.setdefault(
            record.route, {"ok": 0, "failed": 0, "by_status": Counter()}
        )
        route["by_status"][str(record.status)] += 1
        if record.error is not None:
            errors[record.error] += 1
        if scenarios.is_ok(record.route, record.status):
            ok += 1
            route["ok"] += 1
        else:
            failed += 1
            route["failed"] += 1
    for route in by_route.values():
        route["by_status"] = dict(sorted(route["by_status"].items()))
    return {
        "ok": ok,
        "failed": failed,
        "by_status": dict(sorted(by_status.items())),
        "by_route": by_route,
        "errors": dict(errors),
    }


def latency_stats(records: Sequence[load.Record]) -> dict[str, float | None]:
    """Percentiles over the requests that were answered as expected."""
    values = sorted(r.latency_ms for r in records if scenarios.is_ok(r.route, r.status))
    out: dict[str, float | None] = {}
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        value = percentile(values, q)
        out[name] = None if value is None else round(value, 3)
    out["max"] = round(values[-1], 3) if values else None
    out["mean"] = round(statistics.fmean(values), 3) if values else None
    return out


def write_latency_csv(path: Path, records: Sequence[load.Record]) -> None:
    with path.open("w") as fh:
        fh.write("t_s,route,status,latency_ms\n")
        fh.writelines(
            f"{r.t_s:.4f},{r.route},{r.status},{r.latency_ms:.3f}\n" for r in records
        )


def run_json(
    *,
    spec: RunSpec,
    options: Options,
    load_: dict[str, Any],
    weights: dict[str, float],
    ctx: scenarios.Context,
    run_dir: Path,
    phases: _Phases,
    warm: load.LoadResult,
    measured: load.LoadResult,
    sampler_summary: dict[str, Any] | None,
    stats: dict[str, Any] | None,
    release: dict[str, Any] | None,
    hwm_end: float | None,
    crashed: bool,
    exit_code: int | None,
    interrupted: bool,
    error: str | None,
    leftovers: list[int],
    pids: dict[str, int | None],
    env: dict[str, str],
    pg,
) -> dict[str, Any]:
    times, rss = read_rss_csv(run_dir / "rss.csv")
    proc_rows = read_proc_csv(run_dir / "proc.csv")
    spans = phases.spans
    s = sampler_summary or {}

    def span(name: str) -> tuple[float, float] | None:
        entry = spans.get(name)
        if entry is None or "end_s" not in entry:
            return None
        return entry["start_s"], entry["end_s"]

    baseline_span = span("baseline")
    baseline = _median(_window(times, rss, *baseline_span)) if baseline_span else None
    if baseline is None and rss:
        baseline = round(rss[0], 3)
    # The peak of serving: from the ready server to the end of the tail.
    # Start-up has its own (imports, the login's scrypt dummy hash) and is
    # kept apart; VmHWM covers both.
    startup_span = span("startup")
    startup_rss = _window(times, rss, *startup_span) if startup_span else []
    last_measured = span("tail") or span("load") or span("warmup") or baseline_span
    since = baseline_span[0] if baseline_span else 0.0
    until = last_measured[1] if last_measured else (times[-1] if times else 0.0)
    measured_rss = _window(times, rss, since, until) or rss
    peak = round(max(measured_rss), 3) if measured_rss else None
    tail = span("tail")
    end = None
    if tail is not None:
        keep_s = min(1.0, (tail[1] - tail[0]) / 2)
        end = _median(_window(times, rss, tail[1] - keep_s, tail[1]))
    if end is None and measured_rss:
        end = round(measured_rss[-1], 3)
    load_span = span("load")
    after_warmup = None
    if load_span is not None:
        after_warmup = _median(_window(times, rss, load_span[0] - 0.2, load_span[0]))

    if hwm_end is not None:
        hwm, hwm_source = round(hwm_end, 3), "VmHWM after the tail"
    else:
        last = s.get("last_hwm_mib")
        candidates = [v for v in (last, peak) if v is not None]
        hwm = round(max(candidates), 3) if candidates else None
        hwm_source = (
            "the sampler's last VmHWM read (or the sampled peak): the run "
            "ended before its probe"
        )

    req = request_stats(measured.records)
    req["planned"] = measured.planned
    req["sent"] = measured.sent
    req["not_sent"] = measured.not_sent
    req["timed_out"] = measured.timed_out
    req["response_mib"] = round(measured.response_bytes / MIB, 3)
    duration = measured.duration_s if measured.planned else 0.0
    throughput = req["ok"] / duration if duration > 0 else 0.0

    threads = [r["threads"] for r in proc_rows]
    files = [r["open_files"] for r in proc_rows]
    process: dict[str, Any] = {
        "threads_max": int(max(threads)) if threads else None,
        "threads_end": int(threads[-1]) if threads else None,
        "open_files_max": int(max(files)) if files else None,
        "open_files_end": int(files[-1]) if files else None,
        "children_max": s.get("max_children"),
    }
    trend = _trend(times, rss, proc_rows, measured, load_span)

    memory_limit = None
    if options.memory_limit_mib is not None:
        memory_limit = {
            "mib": options.memory_limit_mib,
            "mechanism": options.memory_limit_via,
            "killed": s.get("killed_at_s") is not None,
            "killed_at_s": s.get("killed_at_s"),
            "killed_at_rss_mib": s.get("killed_at_rss_mib"),
        }
    database = (stats or {}).get("database")
    data: dict[str, Any] = {
        "scenario": spec.scenario,
        "variant": spec.variant,
        "naive_patterns": list(spec.naive) if spec.variant != "naive" else [],
        "label": spec.label + options.label_suffix(),
        "preset": options.preset.name,
        "repeat": spec.repeat,
        "repeats": spec.repeats,
        "seed": options.seed,
        "load": {
            "requests": load_["requests"],
            "concurrency": load_["concurrency"],
            "warmup": load_["warmup"],
            "timeout_s": load_["timeout_s"],
            "tail_s": load_["tail_s"],
            "weights": weights,
            "overrides": options.overrides,
            **{
                k: load_[k]
                for k in (
                    "upload_mib",
                    "images",
                    "image_mib",
                    "body_mib",
                    "patient_images",
                )
                if k in options.preset.load(spec.scenario) or k in options.overrides
            },
            "upload_bytes": len(ctx.upload_file[1]) if ctx.upload_file else None,
            "body_bytes": len(ctx.oversized_json) if ctx.oversized_json else None,
            "diagnosis_images": len(ctx.diagnosis_images) or None,
        },
        "rss_mib": {
            "baseline": baseline,
            "after_warmup": after_warmup,
            "peak": peak,
            "startup_peak": round(max(startup_rss), 3) if startup_rss else None,
            "end": end,
            "hwm": hwm,
            "hwm_source": hwm_source,
            "growth": round(peak - baseline, 3)
            if peak is not None and baseline is not None
            else None,
        },
        "requests": req,
        "warmup": {
            "planned": warm.planned,
            "sent": warm.sent,
            **{k: v for k, v in request_stats(warm.records).items() if k != "by_route"},
        },
        "latency_ms": latency_stats(measured.records),
        "throughput_rps": round(throughput, 3),
        "duration_s": round(duration, 3),
        "sampler": {
            "interval_ms": s.get("interval_ms"),
            "nominal_interval_ms": s.get("nominal_interval_ms", options.interval_ms),
            "interval_p99_ms": s.get("interval_p99_ms"),
            "interval_max_ms": s.get("interval_max_ms"),
            "samples": s.get("samples", len(rss)),
            "cpu_s": s.get("cpu_s"),
            "cpu_fraction": s.get("cpu_fraction"),
            "proc_interval_ms": options.proc_interval_ms,
        },
        "crashed": bool(crashed),
        "exit_code": exit_code,
        "died_at_s": s.get("died_at_s"),
        "interrupted": interrupted,
        "error": error,
        "pool_size": options.pool_size,
        "memory_limit_mib": options.memory_limit_mib,
        "memory_limit": memory_limit,
        "release_mib": _release(release),
        "database": database,
        "server_process": (stats or {}).get("process"),
        "process": process,
        "trend": trend,
        "phases": spans,
        "leftover_processes": len(leftovers),
        "pids": pids,
        "dataset": str(options.dataset),
        "db": _db_kind(options.db_url, database),
        "environment": environment.describe(env),
    }
    if pg is not None:
        with contextlib.suppress(Exception):
            pg.write_csv(run_dir / "pg.csv")
            data["db_server"] = pg.summary()
    return data


def _db_kind(db_url: str | None, database: dict[str, Any] | None) -> str:
    """What was served: a private SQLite copy, or a database named by URL."""
    dialect = (database or {}).get("dialect") or (
        db_url.split(":", 1)[0].split("+", 1)[0] if db_url else "sqlite"
    )
    if db_url is None and dialect == "sqlite":
        return "sqlite copy"
    return f"external {dialect}"


def _release(release: dict[str, Any] | None) -> dict[str, Any] | None:
    if release is None:
        return None
    return {
        "as_is": release.get("asIsMib"),
        "after_gc": release.get("afterGcMib"),
        "after_trim": release.get("afterTrimMib"),
        "trimmed": release.get("trimmed"),
    }


def _trend(
    times: list[float],
    rss: list[float],
    proc_rows: list[dict[str, float]],
    measured: load.LoadResult,
    load_span: tuple[float, float] | None,
) -> dict[str, Any]:
    """Growth during the measured load, per 1,000 answered requests.

    Each RSS sample of the load is paired with the number of requests
    answered by then; the least-squares slope of RSS over that count is what
    a leak costs per request, whatever the throughput.
    """
    if load_span is None or not measured.records:
        return {}
    done = sorted(r.t_s + r.latency_ms / 1000 for r in measured.records)
    start, end = load_span

    def answered_by(t: float) -> int:
        return bisect.bisect_right(done, t)

    xs, ys = [], []
    for t, value in zip(times, rss, strict=True):
        if start <= t <= end:
            xs.append(answered_by(t) / 1000)
            ys.append(value)
    half = len(xs) // 2
    out: dict[str, Any] = {
        "rss_mib_per_1k_requests": _round(slope(xs, ys), 4),
        # The second half alone: what is left once the allocator has settled.
        "rss_mib_per_1k_requests_second_half": _round(slope(xs[half:], ys[half:]), 4),
    }
    rows = [r for r in proc_rows if start <= r["t_s"] <= end]
    for column in ("threads", "open_files"):
        px = [answered_by(r["t_s"]) / 1000 for r in rows]
        py = [r[column] for r in rows]
        out[f"{column}_per_1k_requests"] = _round(slope(px, py), 4)
        out[f"{column}_first"] = int(py[0]) if py else None
        out[f"{column}_last"] = int(py[-1]) if py else None
        out[f"{column}_max"] = int(max(py)) if py else None
        # Flat means the second half of the load holds no more than the
        # first once pools and caches have filled.
        middle = (start + end) / 2
        first = [r[column] for r in rows if r["t_s"] < middle]
        second = [r[column] for r in rows if r["t_s"] >= middle]
        out[f"{column}_max_first_half"] = int(max(first)) if first else None
        out[f"{column}_max_second_half"] = int(max(second)) if second else None
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
