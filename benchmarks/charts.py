"""Chart helpers shared by the notebooks.

Every chart draws a variant in the same colour, labels its axes with units,
and names the original's target bands in the legend. Memory is in MiB
(1 GB of the original's write-up is taken as 1 GiB = 1024 MiB), time in
seconds, latency in milliseconds, throughput in requests per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

#: One colour per variant across every chart (Okabe-Ito, readable when
#: colour-blind).
VARIANT_COLOURS = {
    "naive": "#D55E00",
    "optimized": "#0072B2",
    "optimized-plus": "#009E73",
}
#: Optimized with some patterns naive: between the two.
PARTLY_NAIVE_COLOUR = "#E69F00"
#: Things that are not a variant: baselines, fitted lines, markers.
NEUTRAL_COLOUR = "#555555"

MIB_PER_GB = 1024


@dataclass(frozen=True)
class Band:
    """A range of RSS the original reported, drawn as a shaded band."""

    low_mib: float
    high_mib: float
    label: str
    colour: str


BEFORE_BAND = Band(3 * MIB_PER_GB, 4 * MIB_PER_GB, "original before: 3-4 GB", "#D55E00")
AFTER_BAND = Band(
    0.5 * MIB_PER_GB, 1 * MIB_PER_GB, "original after: 0.5-1 GB", "#0072B2"
)
TARGET_BANDS = (BEFORE_BAND, AFTER_BAND)


def colour(variant: str, naive_patterns: Sequence[str] = ()) -> str:
    """The variant's colour; optimized with naive patterns has its own."""
    if variant == "optimized" and naive_patterns:
        return PARTLY_NAIVE_COLOUR
    return VARIANT_COLOURS.get(variant, NEUTRAL_COLOUR)


def label(variant: str, naive_patterns: Sequence[str] = ()) -> str:
    """``optimized`` or ``optimized, upload naive``."""
    if variant == "optimized" and naive_patterns:
        return f"optimized, {'+'.join(naive_patterns)} naive"
    return variant


def new_figure(width_in: float = 8.0, height_in: float = 4.5) -> tuple[Figure, Axes]:
    """One chart per figure, sized to read in a notebook and in a PNG."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width_in, height_in), layout="constrained")
    ax.grid(True, axis="y", alpha=0.3)
    return fig, ax


def new_figures(
    columns: int, width_in: float = 11.0, height_in: float = 4.0
) -> tuple[Figure, list[Axes]]:
    """Charts side by side that share a story (memory beside latency)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, columns, figsize=(width_in, height_in), layout="constrained"
    )
    axes = list(np.atleast_1d(axes))
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    return fig, axes


def draw_bands(ax: Axes, bands: Sequence[Band] = TARGET_BANDS) -> None:
    """Shade the original's RSS ranges; each gets a legend entry."""
    for band in bands:
        ax.axhspan(
            band.low_mib,
            band.high_mib,
            color=band.colour,
            alpha=0.12,
            hatch="//" if band is BEFORE_BAND else None,
            label=band.label,
            zorder=0,
        )


def fit_log_scale(ax: Axes, values_mib: Sequence[float], bands: Sequence[Band]) -> None:
    """Use a log RSS axis when the bands sit far above the measured values,
    so both stay readable on one chart."""
    if not bands or not len(values_mib):
        return
    top = max(band.high_mib for band in bands)
    low = min(values_mib)
    if low > 0 and top / low > 8:
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

        ax.set_yscale("log")
        bottom, ceiling = low / 1.5, top * 1.3
        ax.set_ylim(bottom, ceiling)
        ticks = [t for t in LOG_TICKS_MIB if bottom <= t <= ceiling]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylabel(f"{ax.get_ylabel()}, log scale")


#: Tick marks of a log RSS axis: 1-2-5 steps a reader can take in at a glance.
LOG_TICKS_MIB = [m * 10**e for e in range(0, 6) for m in (1, 2, 5)]


def rss_timeline(
    ax: Axes,
    series: Sequence[tuple[str, str, np.ndarray, np.ndarray]],
    bands: Sequence[Band] = (),
    title: str = "RSS over time",
) -> None:
    """``series``: (label, colour, t_s, rss_mib) per line."""
    values: list[float] = []
    for name, line_colour, t_s, rss in series:
        ax.plot(t_s, rss, color=line_colour, label=name, linewidth=1.6)
        if len(rss):
            values += [float(np.min(rss)), float(np.max(rss))]
    draw_bands(ax, bands)
    ax.set_xlabel("time since the server started (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    fit_log_scale(ax, values, bands)
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")


def bars(
    ax: Axes,
    names: Sequence[str],
    values: Sequence[float],
    colours: Sequence[str],
    unit: str,
    title: str,
    spread: Sequence[tuple[float, float]] | None = None,
    value_format: str = "{:.0f}",
    horizontal: bool = False,
) -> None:
    """Bars with their value written on them; ``spread`` is (low, high) of
    the repeats, drawn as an error bar around the median."""
    positions = np.arange(len(names))
    errors = None
    if spread is not None and any(lo != hi for lo, hi in spread):
        errors = np.array(
            [
                [v - lo for v, (lo, _hi) in zip(values, spread, strict=True)],
                [hi - v for v, (_lo, hi) in zip(values, spread, strict=True)],
            ]
        )
    draw = ax.barh if horizontal else ax.bar
    drawn = draw(
        positions,
        values,
        color=colours,
        **({"xerr": errors} if horizontal else {"yerr": errors}),
        capsize=4 if errors is not None else 0,
    )
    ax.bar_label(drawn, labels=[value_format.format(v) for v in values], padding=3)
    if horizontal:
        ax.set_yticks(positions, names)
        ax.set_xlabel(unit)
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
        ax.margins(x=0.18)
    else:
        ax.set_xticks(positions, names)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
    ax.set_title(title)


def grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    values: dict[str, Sequence[float]],
    colours: dict[str, str],
    unit: str,
    title: str,
    value_format: str = "{:.0f}",
) -> None:
    """Bars grouped by ``groups`` (p50, p95 ...), one bar per series in it."""
    positions = np.arange(len(groups))
    width = 0.8 / max(len(values), 1)
    for i, (name, series) in enumerate(values.items()):
        offset = (i - (len(values) - 1) / 2) * width
        drawn = ax.bar(
            positions + offset, series, width, color=colours[name], label=name
        )
        ax.bar_label(drawn, labels=[value_format.format(v) for v in series], padding=2)
    ax.set_xticks(positions, groups)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.margins(y=0.15)
    ax.legend(loc="best", fontsize="small")


def ratio_bars(
    ax: Axes,
    names: Sequence[str],
    ratios: Sequence[float],
    colours: Sequence[str],
    title: str,
    reference_label: str = "1x: no difference",
) -> None:
    """Ratios against a reference (naive / optimized), with the 1x line drawn."""
    bars(ax, names, ratios, colours, "ratio (x)", title, value_format="{:.1f}x")
    ax.axhline(
        1.0, color=NEUTRAL_COLOUR, linestyle="--", linewidth=1, label=reference_label
    )
    ax.legend(loc="best", fontsize="small")


SWEEP_MARKERS = ("o", "s", "^")
SWEEP_LINES = ("-", "--", ":")


@dataclass(frozen=True)
class Fit:
    """A least-squares line through one variant's sweep."""

    slope: float
    intercept: float

    def at(self, x: np.ndarray) -> np.ndarray:
        return self.slope * x + self.intercept


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit:
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(set(xs.tolist())) < 2:
        return Fit(0.0, float(np.mean(ys)))
    slope, intercept = np.polyfit(xs, ys, 1)
    return Fit(float(slope), float(intercept))


def sweep(
    ax: Axes,
    series: Sequence[tuple[str, str, Sequence[float], Sequence[float]]],
    x_label: str,
    y_label: str,
    slope_unit: str,
    title: str,
) -> dict[str, Fit]:
    """Points per variant with a fitted line; the slope is in the legend, so
    growth with the driving quantity is shown and measured, not claimed."""
    fits: dict[str, Fit] = {}
    ticks: set[float] = set()
    for n, (name, line_colour, x, y) in enumerate(series):
        fit = fit_line(x, y)
        fits[name] = fit
        xs = np.asarray(x, dtype=float)
        # Later series dashed with hollow markers: equal values stay visible.
        ax.scatter(
            xs,
            y,
            marker=SWEEP_MARKERS[n % len(SWEEP_MARKERS)],
            s=60 if n else 36,
            facecolors="none" if n else line_colour,
            edgecolors=line_colour,
            zorder=3,
        )
        ticks |= set(xs.tolist())
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(
            grid,
            fit.at(grid),
            color=line_colour,
            linewidth=1.4,
            linestyle=SWEEP_LINES[n % len(SWEEP_LINES)],
            label=f"{name}: slope {fit.slope:+.2f} {slope_unit}",
        )
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    return fits


def save(fig: Figure, path) -> None:
    """Write the figure as PNG beside the notebook's results."""
    fig.savefig(path, dpi=110)
