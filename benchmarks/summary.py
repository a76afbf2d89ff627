"""Comparison of runs: per scenario, each variant's median and range, and the
naive/optimized ratio of each interleaved pair.

``compare(runs)`` takes run results, run.json dicts or run folders and
returns a dict::

    {"scenarios": {
        "listing": {
            "preset": "ci",
            "reference": "naive",
            "variants": {
                "naive": {"runs": 3, "crashed": 0, "ok": 120, "failed": 0,
                          "peak_mib": {"median": ..., "min": ..., "max": ...},
                          "growth_mib": {...}, "end_mib": {...}, "hwm_mib": {...},
                          "baseline_mib": {...}, "throughput_rps": {...},
                          "p99_ms": {...}},
                "optimized": {...}},
            "ratios": {
                "optimized": {"peak": {"pairs": [4.1, 3.9, 4.0], "median": 4.0},
                              "growth": {...}, "throughput": {...}}}}}}

A ratio is reference / variant for memory (above 1: the variant holds less)
and variant / reference for throughput (above 1: the variant serves more),
paired by repeat index, so runs measured side by side are compared with
each other. A growth below 1 MiB makes no ratio (None): dividing by noise
says nothing. ``write(out, comparison)`` leaves summary.json and summary.md.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The smallest growth (MiB) a ratio is taken over.
MIN_GROWTH_MIB = 1.0

_METRICS = {
    "peak_mib": lambda d: d["rss_mib"]["peak"],
    "growth_mib": lambda d: _growth(d),
    "end_mib": lambda d: d["rss_mib"]["end"],
    "hwm_mib": lambda d: d["rss_mib"]["hwm"],
    "baseline_mib": lambda d: d["rss_mib"]["baseline"],
    "throughput_rps": lambda d: d["throughput_rps"],
    "p99_ms": lambda d: d["latency_ms"]["p99"],
}


def _growth(data: dict[str, Any]) -> float | None:
    rss = data["rss_mib"]
    if rss.get("peak") is None or rss.get("baseline") is None:
        return None
    return rss["peak"] - rss["baseline"]


def _as_data(run: Any) -> dict[str, Any]:
    if isinstance(run, dict):
        return run
    if isinstance(run, str | Path):
        return json.loads((Path(run) / "run.json").read_text())
    return run.data


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(present), 3),
        "min": round(min(present), 3),
        "max": round(max(present), 3),
    }


def _ratio(num: float | None, den: float | None, floor: float = 0.0) -> float | None:
    if num is None or den is None or den <= floor:
        return None
    return round(num / den, 3)


def compare(runs: Iterable[Any]) -> dict[str, Any]:
    """The comparison of ``runs``; see the module docstring."""
    grouped: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        data = _as_data(run)
        label = data.get("label") or data["variant"]
        key = (data["scenario"], data["preset"])
        grouped.setdefault(key, {}).setdefault(label, []).append(data)

    scenarios: dict[str, Any] = {}
    for (scenario, preset), by_label in grouped.items():
        name = scenario if scenario not in scenarios else f"{scenario}@{preset}"
        reference = "naive" if "naive" in by_label else next(iter(by_label))
        variants = {}
        for label, items in by_label.items():
            items.sort(key=lambda d: d.get("repeat", 0))
            entry: dict[str, Any] = {
                "runs": len(items),
                "crashed": sum(bool(d.get("crashed")) for d in items),
                "ok": sum(d["requests"]["ok"] for d in items),
                "failed": sum(d["requests"]["failed"] for d in items),
                "not_sent": sum(d["requests"].get("not_sent", 0) for d in items),
            }
            for metric, getter in _METRICS.items():
                entry[metric] = spread([getter(d) for d in items])
            variants[label] = entry
        ratios = {}
        ref_by_repeat = {d.get("repeat"): d for d in by_label[reference]}
        for label, items in by_label.items():
            if label == reference:
                continue
            pairs: dict[str, list[float | None]] = {
                "peak": [],
                "growth": [],
                "throughput": [],
            }
            for data in items:
                ref = ref_by_repeat.get(data.get("repeat"))
                if ref is None:
                    continue
                pairs["peak"].append(
                    _ratio(ref["rss_mib"]["peak"], data["rss_mib"]["peak"])
                )
                pairs["growth"].append(
                    _ratio(_growth(ref), _growth(data), MIN_GROWTH_MIB)
                )
                pairs["throughput"].append(
                    _ratio(data["throughput_rps"], ref["throughput_rps"])
                )
            ratios[label] = {
                name_: {
                    "pairs": values,
                    "median": spread(values)["median"],
                    "min": spread(values)["min"],
                    "max": spread(values)["max"],
                }
                for name_, values in pairs.items()
            }
        scenarios[name] = {
            "scenario": scenario,
            "preset": preset,
            "reference": reference,
            "variants": variants,
            "ratios": ratios,
        }
    return {"scenarios": scenarios}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _range(entry: dict[str, float | None], digits: int = 1) -> str:
    if entry["median"] is None:
        return "-"
    if entry["min"] == entry["max"]:
        return _fmt(entry["median"], digits)
    return (
        f"{_fmt(entry['median'], digits)} "
        f"({_fmt(entry['min'], digits)}-{_fmt(entry['max'], digits)})"
    )


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as Markdown: a table per scenario, medians (min-max)."""
    lines = ["# Benchmark summary", ""]
    for name, entry in comparison["scenarios"].items():
        lines += [
            f"## {name} ({entry['preset']} preset)",
            "",
            "| variant | runs | peak MiB | growth MiB | end MiB | hwm MiB "
            "| req/s | p99 ms | ok | failed | crashed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, v in entry["variants"].items():
            lines.append(
                f"| {label} | {v['runs']} | {_range(v['peak_mib'])} "
                f"| {_range(v['growth_mib'])} | {_range(v['end_mib'])} "
                f"| {_range(v['hwm_mib'])} | {_range(v['throughput_rps'])} "
                f"| {_range(v['p99_ms'])} | {v['ok']} | {v['failed']} "
                f"| {v['crashed']} |"
            )
        if entry["ratios"]:
            lines += [
                "",
                f"Ratios against {entry['reference']}, per interleaved pair "
                "(memory: reference / variant; throughput: variant / reference):",
                "",
                "| variant | peak | growth | throughput |",
                "|---|---|---|---|",
            ]
            for label, r in entry["ratios"].items():
                lines.append(
                    f"| {label} | {_range(r['peak'], 2)} | {_range(r['growth'], 2)} "
                    f"| {_range(r['throughput'], 2)} |"
                )
        lines.append("")
    return "\n".join(lines)


def write(out: Path, comparison: dict[str, Any]) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "summary.json"
    md_path = out / "summary.md"
    json_path.write_text(json.dumps(comparison, indent=2) + "\n")
    md_path.write_text(markdown(comparison))
    return json_path, md_path
