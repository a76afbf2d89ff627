"""The figures every notebook draws, made from measured runs.

Each function takes the runs of a measurement (by variant, as
:meth:`benchmarks.study.Study.measure` returns them) and gives back one
matplotlib figure; the notebook shows and saves it with ``study.show``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from benchmarks import charts
from benchmarks.study import Run, Runs

ByVariant = Mapping[str, Runs]


def rss_over_time(
    runs: ByVariant, title: str, bands: Sequence[charts.Band] = ()
) -> Figure:
    """RSS of the server from the moment it was ready, the first repeat of each
    variant, its time counted from the start of the measured load (negative:
    the idle baseline and the warm-up). A dotted line marks where each
    variant's load ended; the idle tail follows."""
    fig, ax = charts.new_figure()
    series = []
    for r in runs.values():
        t_s, rss = aligned_rss(r.first)
        series.append((r.label, r.colour, t_s, rss))
    charts.rss_timeline(ax, series, bands=bands, title=title)
    ax.set_xlabel("time since the measured load started (s)")
    ax.axvline(0, color=charts.NEUTRAL_COLOUR, linewidth=1)
    for r in runs.values():
        load = r.first.meta["phases"]["load"]
        ax.axvline(
            load["end_s"] - load["start_s"],
            color=r.colour,
            linestyle=":",
            linewidth=1.2,
        )
    ax.text(
        0.01,
        0.01,
        "solid grey line: load starts; dotted: each variant's load ends",
        transform=ax.transAxes,
        fontsize="x-small",
        color=charts.NEUTRAL_COLOUR,
    )
    return fig


def aligned_rss(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """The run's RSS samples from the ready server on, time counted from the
    start of its measured load."""
    return aligned(run, "rss", "rss_mib")


def aligned(run: Run, table: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A sampled column (``rss`` or ``proc`` table) from the ready server on,
    time counted from the start of the run's measured load."""
    phases = run.meta["phases"]
    data = getattr(run, table)
    t_s, values = data["t_s"], data[column]
    ready = phases.get("baseline", phases["load"])["start_s"]
    keep = t_s >= ready
    return t_s[keep] - phases["load"]["start_s"], values[keep]


def peaks(runs: ByVariant, title: str) -> Figure:
    """Peak RSS and growth over the idle baseline, per variant (median of the
    repeats, their range as error bars)."""
    fig, (left, right) = charts.new_figures(2)
    names = [r.label for r in runs.values()]
    colours = [r.colour for r in runs.values()]
    for ax, attr, unit, what in (
        (left, "peak_mib", "peak RSS (MiB)", "Peak RSS"),
        (right, "growth_mib", "peak - baseline (MiB)", "Growth over baseline"),
    ):
        charts.bars(
            ax,
            names,
            [r.median(attr) for r in runs.values()],
            colours,
            unit,
            what,
            spread=[r.spread(attr) for r in runs.values()],
        )
    left.axhline(
        np.median([r.median("baseline_mib") for r in runs.values()]),
        color=charts.NEUTRAL_COLOUR,
        linestyle=":",
        label="idle baseline",
    )
    left.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    return fig


def ratios(runs: ByVariant, title: str, reference: str = "naive") -> Figure:
    """How many times the reference's peak and growth each variant's are."""
    base = runs[reference]
    others = [r for name, r in runs.items() if name != reference]
    fig, ax = charts.new_figure(7, 4)
    names, values, colours = [], [], []
    for attr, what in (("peak_mib", "peak"), ("growth_mib", "growth")):
        for other in others:
            names.append(f"{what}\n{reference} / {other.label}")
            values.append(base.median(attr) / max(other.median(attr), 1.0))
            colours.append(other.colour)
    charts.ratio_bars(ax, names, values, colours, title)
    return fig


def latency_throughput(runs: ByVariant, title: str) -> Figure:
    """Latency percentiles and throughput side by side, per variant."""
    fig, (left, right) = charts.new_figures(2)
    percentiles = ("p50", "p95", "p99")
    latencies = {r.label: [r.latency(p) for p in percentiles] for r in runs.values()}
    charts.grouped_bars(
        left,
        list(percentiles),
        latencies,
        {r.label: r.colour for r in runs.values()},
        "latency (ms)",
        "Latency of answered requests",
    )
    values = [v for series in latencies.values() for v in series if v > 0]
    if values and max(values) / min(values) > 30:
        # Seconds beside milliseconds: a log axis keeps both readable.
        left.set_yscale("log")
        left.set_ylabel("latency (ms), log scale")
    charts.bars(
        right,
        [r.label for r in runs.values()],
        [r.median("throughput_rps") for r in runs.values()],
        [r.colour for r in runs.values()],
        "throughput (requests/s)",
        "Throughput",
        spread=[r.spread("throughput_rps") for r in runs.values()],
        value_format="{:.1f}",
    )
    fig.suptitle(title)
    return fig


def proc_over_time(runs: ByVariant, title: str) -> Figure:
    """Threads and open files of the server process over time, counted from
    the start of the measured load, as the RSS is. A long run is shown as the
    most in each of about 150 slices of time, so its trend reads at a glance."""
    fig, (left, right) = charts.new_figures(2)
    for ax, column, unit in (
        (left, "threads", "threads"),
        (right, "open_files", "open files (file descriptors)"),
    ):
        binned = False
        for r in runs.values():
            raw = aligned(r.first, "proc", column)
            t_s, values = binned_max(*raw)
            binned = binned or len(t_s) < len(raw[0])
            ax.step(t_s, values, where="post", color=r.colour, label=r.label)
        ax.axvline(0, color=charts.NEUTRAL_COLOUR, linewidth=1)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("time since the measured load started (s)")
        ax.set_ylabel(f"{unit}, most per slice of time" if binned else unit)
        ax.set_title(unit.split(" (")[0].capitalize())
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    return fig


#: Samples a line may have before it is drawn as the most per slice of time.
MAX_POINTS = 300


def binned_max(
    t_s: np.ndarray, values: np.ndarray, bins: int = MAX_POINTS // 2
) -> tuple[np.ndarray, np.ndarray]:
    """The largest value in each of ``bins`` equal slices of time (the data as
    it is when it has few samples)."""
    if len(t_s) <= MAX_POINTS:
        return t_s, values
    edges = np.linspace(t_s.min(), t_s.max(), bins + 1)
    index = np.clip(np.searchsorted(edges, t_s, side="right") - 1, 0, bins - 1)
    most = np.full(bins, np.nan)
    np.fmax.at(most, index, values)
    keep = ~np.isnan(most)
    return edges[:-1][keep], most[keep]


Metric = Callable[[Runs], float]


def peak_of(runs: Runs) -> float:
    return runs.median("peak_mib")


def sweep(
    points: Sequence[tuple[float, ByVariant]],
    x_label: str,
    slope_unit: str,
    title: str,
    metric: Metric = peak_of,
    y_label: str = "peak RSS (MiB)",
) -> tuple[Figure, dict[str, charts.Fit]]:
    """A metric against the quantity that drives it, one fitted line per
    variant; returns the fits by variant label."""
    fig, ax = charts.new_figure()
    fits = charts.sweep(
        ax, sweep_series(points, metric), x_label, y_label, slope_unit, title
    )
    return fig, fits


def sweep_series(
    points: Sequence[tuple[float, ByVariant]], metric: Metric = peak_of
) -> list[tuple[str, str, list[float], list[float]]]:
    """(label, colour, xs, ys) per variant measured at every point of the
    sweep (a variant measured at one point only has no slope to show)."""
    series: dict[str, tuple[str, str, list[float], list[float]]] = {}
    for x, runs in sorted(points, key=lambda p: p[0]):
        for r in runs.values():
            entry = series.setdefault(r.label, (r.label, r.colour, [], []))
            entry[2].append(float(x))
            entry[3].append(float(metric(r)))
    return [entry for entry in series.values() if len(entry[2]) == len(points)]


def sweep_panels(
    points: Sequence[tuple[float, ByVariant]],
    panels: Sequence[tuple[str, str, Metric, str]],
    x_label: str,
    title: str,
) -> tuple[Figure, dict[str, dict[str, charts.Fit]]]:
    """Several metrics against one quantity, two charts a row (memory beside
    threads and open files); ``panels`` are (title, y label, metric, slope
    unit). Returns the fits by panel title, then by variant label."""
    import matplotlib.pyplot as plt

    rows = (len(panels) + 1) // 2
    fig, grid = plt.subplots(
        rows, 2, figsize=(11, 4 * rows), layout="constrained", squeeze=False
    )
    axes = list(grid.flat)
    fits = {}
    for ax, (name, y_label, metric, slope_unit) in zip(axes, panels, strict=False):
        ax.grid(True, axis="y", alpha=0.3)
        fits[name] = charts.sweep(
            ax, sweep_series(points, metric), x_label, y_label, slope_unit, name
        )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, fits


def backends_side_by_side(rows: Sequence[Mapping]) -> Figure:
    """The ``client`` load on each database (rows of
    :func:`benchmarks.backends.client_rows`): throughput beside the memory it
    took, the app's peak RSS with, on PostgreSQL, its backends' summed RSS
    stacked on top."""
    fig, (speed, memory) = charts.new_figures(2, height_in=0.6 * len(rows) + 1.8)
    names = [f"{r['backend']}, {r['variant']}\n{r['pool']}" for r in rows]
    colours = [charts.colour(r["variant"]) for r in rows]
    charts.bars(
        speed,
        names,
        [r["throughput_rps"] for r in rows],
        colours,
        "throughput (requests/s)",
        "Throughput",
        value_format="{:.1f}",
        horizontal=True,
    )
    positions = np.arange(len(rows))
    app = [r["app_rss_peak_mib"] for r in rows]
    server = [r["server_backends_rss_mib_peak"] or 0.0 for r in rows]
    memory.barh(positions, app, color=colours)
    drawn = memory.barh(
        positions,
        server,
        left=app,
        color=charts.NEUTRAL_COLOUR,
        alpha=0.45,
    )
    memory.bar_label(
        drawn,
        labels=[f"{a + s:.0f}" for a, s in zip(app, server, strict=True)],
        padding=3,
    )
    memory.set_yticks(positions, [""] * len(rows))
    memory.set_xlabel("RSS (MiB)")
    memory.grid(True, axis="x", alpha=0.3)
    memory.grid(False, axis="y")
    memory.margins(x=0.18)
    memory.set_title("Memory: the app, and the database server's backends")
    memory.legend(
        handles=[
            Patch(facecolor="white", edgecolor="black", label="app peak RSS"),
            Patch(
                facecolor=charts.NEUTRAL_COLOUR,
                alpha=0.45,
                label="PostgreSQL backends, summed RSS at peak",
            ),
        ],
        loc="upper right",
        fontsize="small",
    )
    for ax in (speed, memory):
        ax.invert_yaxis()
    fig.suptitle("client: SQLite and PostgreSQL side by side")
    return fig
