"""What a notebook measures and keeps: runs through the harness, read back as
arrays, figures and results written to the notebook's output folder.

A notebook makes one ``Study``; ``study.measure(...)`` runs ``membench run``
(through :func:`benchmarks.runner.run_scenario`) into
``OUT/<notebook>/runs/`` and returns the runs it made, one per repeat.
``study.show(fig, name)`` writes ``OUT/<notebook>/<name>.png`` and displays
it; ``study.claim(...)`` and ``study.value(...)`` fill
``OUT/<notebook>/results.json``, which the HTML report reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import charts

log = logging.getLogger("benchmarks")

VERDICTS = ("confirmed", "partly", "refuted", "not measured")


#: Dataset parameters that change which image files exist, not the rows: a
#: sweep may shrink them to build faster and still compare with the preset.
FILES_ONLY = {"distinct_images"}


class RunFailed(RuntimeError):
    """Raised when the harness could not measure a run (its ``error`` key)."""


def run_in_thread(*args: Any, **kwargs: Any) -> list[Any]:
    """:func:`benchmarks.runner.run_scenario` on a thread of its own.

    The harness drives its load with ``asyncio.run``, which refuses to start
    inside a running event loop, and a notebook kernel's main thread runs
    one. The thread lives until every server it started is stopped.
    """
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks import runner

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="membench-run") as pool:
        return pool.submit(runner.run_scenario, *args, **kwargs).result()


@dataclass(frozen=True)
class Run:
    """One run folder: ``run.json`` and the CSV files beside it."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> Run:
        path = Path(path)
        return cls(path, json.loads((path / "run.json").read_text()))

    @property
    def scenario(self) -> str:
        return self.meta["scenario"]

    @property
    def variant(self) -> str:
        return self.meta["variant"]

    @property
    def naive_patterns(self) -> tuple[str, ...]:
        if self.variant == "naive":
            return ()
        return tuple(self.meta.get("naive_patterns") or ())

    @property
    def label(self) -> str:
        return charts.label(self.variant, self.naive_patterns)

    @property
    def colour(self) -> str:
        return charts.colour(self.variant, self.naive_patterns)

    def rss_value(self, key: str) -> float:
        return float(self.meta["rss_mib"][key])

    @property
    def peak_mib(self) -> float:
        return self.rss_value("peak")

    @property
    def baseline_mib(self) -> float:
        return self.rss_value("baseline")

    @property
    def end_mib(self) -> float:
        return self.rss_value("end")

    @property
    def hwm_mib(self) -> float:
        return self.rss_value("hwm")

    @property
    def growth_mib(self) -> float:
        """Peak RSS over the idle server's baseline."""
        return self.peak_mib - self.baseline_mib

    @property
    def threads_max(self) -> float:
        return float(self.meta["process"]["threads_max"])

    @property
    def open_files_max(self) -> float:
        return float(self.meta["process"]["open_files_max"])

    @property
    def connections_opened(self) -> float:
        """Database connections the server opened during the whole run."""
        return float((self.meta.get("database") or {}).get("connectionsOpened", 0))

    @property
    def engines_created(self) -> float:
        """Database engines (clients) the server built during the whole run."""
        return float((self.meta.get("database") or {}).get("enginesCreated", 0))

    @property
    def requests_sent(self) -> float:
        """Requests of the measured load and its warm-up."""
        return float(self.meta["requests"]["sent"] + self.meta["warmup"]["sent"])

    def trend(self, key: str) -> float:
        """Change per 1,000 requests during the load (``rss_mib``, ``threads``,
        ``open_files``)."""
        return float(self.meta["trend"][f"{key}_per_1k_requests"])

    def _during_load(
        self, table: str, column: str, start_fraction: float, end_fraction: float
    ) -> tuple[np.ndarray, np.ndarray]:
        load = self.meta["phases"]["load"]
        span_s = load["end_s"] - load["start_s"]
        data = getattr(self, table)
        t_s = data["t_s"]
        keep = (t_s >= load["start_s"] + start_fraction * span_s) & (
            t_s <= load["start_s"] + end_fraction * span_s
        )
        return t_s[keep], data[column][keep]

    def halves_max(self, table: str, column: str) -> tuple[float, float]:
        """The largest value in the first and in the second half of the load
        (``table`` is ``rss`` or ``proc``): a leak makes the second larger."""
        _, first = self._during_load(table, column, 0.0, 0.5)
        _, second = self._during_load(table, column, 0.5, 1.0)
        return float(first.max()), float(second.max())

    def late_slope_per_1k(self, table: str, column: str) -> float:
        """Slope of ``column`` over the second half of the load, per 1,000
        requests: how it still moves once the server has warmed up."""
        t_s, values = self._during_load(table, column, 0.5, 1.0)
        if len(t_s) < 2:
            return 0.0
        per_s = float(np.polyfit(t_s, values, 1)[0])
        load = self.meta["phases"]["load"]
        seconds_per_request = (load["end_s"] - load["start_s"]) / max(
            self.meta["requests"]["sent"], 1
        )
        return per_s * seconds_per_request * 1000

    @property
    def crashed(self) -> bool:
        return bool(self.meta.get("crashed"))

    def release(self, key: str) -> float:
        """RSS after the load: ``as_is``, ``after_gc``, ``after_trim``."""
        return float(self.meta["release_mib"][key])

    def latency_value(self, key: str) -> float:
        value = self.meta["latency_ms"].get(key)
        return float("nan") if value is None else float(value)

    @property
    def throughput_rps(self) -> float:
        return float(self.meta.get("throughput_rps") or 0.0)

    @property
    def ok(self) -> int:
        return int(self.meta["requests"]["ok"])

    @property
    def failed(self) -> int:
        return int(self.meta["requests"]["failed"])

    def table(self, name: str) -> dict[str, np.ndarray]:
        """A CSV of the run as one array per column (numbers where they parse)."""
        path = self.path / name
        if not path.is_file():
            return {}
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            return {}
        return {key: _column([row[key] for row in rows]) for key in rows[0]}

    @cached_property
    def rss(self) -> dict[str, np.ndarray]:
        """``t_s`` and ``rss_mib``, one entry per sample."""
        return self.table("rss.csv")

    @cached_property
    def latency(self) -> dict[str, np.ndarray]:
        """``t_s``, ``route``, ``status``, ``latency_ms``, one entry per request."""
        return self.table("latency.csv")

    @cached_property
    def proc(self) -> dict[str, np.ndarray]:
        """Threads, open files (and whatever else was sampled) over time."""
        return self.table("proc.csv")


def _column(values: list[str]) -> np.ndarray:
    try:
        return np.array([float(v) if v != "" else np.nan for v in values])
    except ValueError:
        return np.array(values)


@dataclass
class Runs:
    """The repeats of one measurement; figures use the median and the range."""

    runs: list[Run]

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def label(self) -> str:
        return self.first.label

    @property
    def colour(self) -> str:
        return self.first.colour

    def values(self, attr: str) -> list[float]:
        return [float(getattr(run, attr)) for run in self.runs]

    def median(self, attr: str) -> float:
        return float(statistics.median(self.values(attr)))

    def spread(self, attr: str) -> tuple[float, float]:
        values = self.values(attr)
        return min(values), max(values)

    def latency(self, key: str) -> float:
        return float(statistics.median(r.latency_value(key) for r in self.runs))


@dataclass
class Study:
    """One notebook's measurements and what it concludes from them."""

    name: str
    preset: str
    out_dir: Path
    repeats: int = 1
    claims: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir).resolve() / self.name
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def runs_dir(self) -> Path:
        return self.out_dir / "runs"

    def measure(
        self,
        scenario: str,
        variants: Sequence[str] = ("naive", "optimized"),
        naive: Sequence[str] = (),
        overrides: dict[str, Any] | None = None,
        repeats: int | None = None,
        tag: str = "",
        **options: Any,
    ) -> dict[str, Runs]:
        """Run ``membench run`` for one scenario at this preset, the variants
        interleaved; their runs by variant name.

        ``options`` go to :func:`benchmarks.runner.run_scenario` as they are
        (``dataset``, ``memory_limit_mib``, ``malloc_arena_max``, ...).
        """
        key_options = {**(overrides or {}), **options}
        folder = self.runs_dir / run_key(
            scenario, "+".join(variants), naive, key_options, tag
        )
        # A folder left by an earlier execution would mix old runs with new.
        shutil.rmtree(folder, ignore_errors=True)
        results = run_in_thread(
            scenario,
            list(variants),
            self.preset,
            naive=tuple(naive),
            out=folder,
            repeat=repeats or self.repeats,
            overrides=dict(overrides or {}),
            **options,
        )
        by_variant: dict[str, Runs] = {}
        for result in results:
            run = Run(Path(result.path), result.data)
            if run.meta.get("error"):
                raise RunFailed(f"{run.path.name}: {run.meta['error']}")
            by_variant.setdefault(run.variant, Runs([])).runs.append(run)
        return by_variant

    def preset_value(self, key: str, scenario: str | None = None) -> Any:
        """A value of this preset: of its load for ``scenario``, else of its
        dataset."""
        from reference_impl.presets import load_preset

        preset = load_preset(self.preset)
        table = preset.load(scenario) if scenario else preset.dataset
        return table[key]

    def sweep(
        self,
        scenario: str,
        key: str,
        values: Sequence[Any],
        *,
        where: str = "load",
        main: dict[str, Runs] | None = None,
        variants: Sequence[str] = ("naive", "optimized"),
        fixed: dict[str, Any] | None = None,
        **options: Any,
    ) -> list[tuple[float, dict[str, Runs]]]:
        """Measure ``scenario`` at each value of one load key (``where="load"``)
        or dataset parameter (``where="dataset"``); ``fixed`` changes further
        dataset parameters at every point. The point at the preset's own value
        reuses ``main``, the runs already made there, unless ``fixed`` moved
        the dataset's rows away from the preset's."""
        if where not in ("load", "dataset"):
            raise ValueError(f"where={where!r} must be 'load' or 'dataset'")
        own = self.preset_value(key, scenario if where == "load" else None)
        points = []
        for value in values:
            if main is not None and value == own and set(fixed or {}) <= FILES_ONLY:
                points.append((value, main))
                continue
            options_here = dict(options)
            overrides = dict(options_here.pop("overrides", None) or {})
            changes = dict(fixed or {})
            if where == "dataset":
                changes[key] = value
            else:
                overrides[key] = value
            if changes:
                options_here["dataset"] = self.dataset(**changes)
            runs = self.measure(
                scenario,
                variants,
                overrides=overrides,
                tag=f"{key}={value}",
                **options_here,
            )
            points.append((value, runs))
        return points

    def dataset(self, **changes: Any) -> Path:
        """A dataset of this preset with some parameters changed (``patients``,
        ``images_per_patient`` ...), built once and shared by the notebooks
        writing to the same output folder: same parameters, same bytes."""
        from reference_impl import datagen
        from reference_impl.presets import load_preset

        table = {**load_preset(self.preset).dataset, **changes}
        key = "-".join(f"{k}={v}" for k, v in sorted(changes.items())) or "preset"
        folder = self.out_dir.parent / "datasets" / self.preset / key
        if not (folder / "manifest.json").is_file():
            params = datagen.DatasetParams.from_table(table, where=f"dataset {key}")
            datagen.build_dataset(params, folder, preset=f"{self.preset}:{key}")
        return folder

    def show(self, fig, name: str) -> None:
        """Save the figure as ``<name>.png`` and display it once."""
        import matplotlib.pyplot as plt

        path = self.out_dir / f"{name}.png"
        charts.save(fig, path)
        if name not in self.figures:
            self.figures.append(name)
        plt.show()

    def value(self, key: str, value: Any) -> Any:
        """Keep a measured number in the results; returns it unchanged."""
        self.values[key] = value
        return value

    def add_summary(self, scenario: str, naive: Runs, optimized: Runs, **extra) -> None:
        """One row of the report's summary table: peaks of the two variants."""
        peak_naive = naive.median("peak_mib")
        peak_optimized = optimized.median("peak_mib")
        self.summary.append(
            {
                "scenario": scenario,
                "peak_naive_mib": round(peak_naive, 1),
                "peak_optimized_mib": round(peak_optimized, 1),
                "peak_ratio": round(peak_naive / peak_optimized, 2),
                "growth_naive_mib": round(naive.median("growth_mib"), 1),
                "growth_optimized_mib": round(optimized.median("growth_mib"), 1),
                **extra,
            }
        )

    def claim(
        self, claim: str, verdict: str, measured: str, figure: str | None = None
    ) -> dict[str, Any]:
        """A claim of the original, what was measured against it, and where."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
        entry = {
            "claim": claim,
            "verdict": verdict,
            "measured": measured,
            "figure": f"{figure}.png" if figure else None,
            "preset": self.preset,
        }
        self.claims.append(entry)
        return entry

    def save(self) -> None:
        """Write ``results.json``: the summary rows, claims, values, figures."""
        path = self.out_dir / "results.json"
        document = {
            "notebook": self.name,
            "preset": self.preset,
            "repeats": self.repeats,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "summary": self.summary,
            "claims": self.claims,
            "values": self.values,
            "figures": [f"{name}.png" for name in self.figures],
        }
        path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")


def describe(runs: dict[str, Runs]) -> str:
    """A plain-text table of what was measured: the load and the headline
    numbers per variant (medians of the repeats)."""
    first = next(iter(runs.values())).first
    load = first.meta["load"]
    lines = [
        f"{first.scenario} at preset {first.meta['preset']}: {load['requests']}"
        f" requests at concurrency {load['concurrency']} after"
        f" {load.get('warmup', 0)} warm-up, {len(runs[first.variant])}"
        " repeat(s) per variant",
        f"{'variant':<30}{'base':>8}{'peak':>8}{'growth':>8}{'end':>8}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'req/s':>8}{'ok':>6}{'fail':>6}",
    ]
    for r in runs.values():
        lines.append(
            f"{r.label:<30}{r.median('baseline_mib'):>8.1f}{r.median('peak_mib'):>8.1f}"
            f"{r.median('growth_mib'):>8.1f}{r.median('end_mib'):>8.1f}"
            f"{r.latency('p50'):>9.1f}{r.latency('p95'):>9.1f}"
            f"{r.median('throughput_rps'):>8.1f}{sum(r.values('ok')):>6.0f}"
            f"{sum(r.values('failed')):>6.0f}"
        )
    lines.append("(RSS in MiB)")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def run_key(
    scenario: str,
    variant: str,
    naive: Iterable[str] = (),
    overrides: dict[str, Any] | None = None,
    tag: str = "",
) -> str:
    """A folder name that tells the run apart: ``listing-optimized-naive-upload``
    plus a short digest of the overrides."""
    parts = [scenario, variant]
    if naive:
        parts += ["naive", *sorted(naive)]
    if tag:
        parts.append(tag)
    if overrides:
        digest = hashlib.sha1(
            json.dumps(overrides, sort_keys=True, default=str).encode()
        ).hexdigest()[:8]
        parts.append(digest)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))
