"""Run benchmark scenarios against fresh server processes and write run files.

Each run starts a new ``membench serve`` process in its own session, samples
its RSS every 10 ms from another process, drives the scenario's load
(warm-up, measured requests, an idle tail), probes what stays resident, stops
everything it started and leaves a folder::

    OUT/<scenario>/<variant>[+naive-PATTERNS]-r<k>-<timestamp>/
        run.json      every figure of the run (keys below)
        rss.csv       t_s,rss_mib: the server and its children, every ~10 ms
        latency.csv   t_s,route,status,latency_ms: one row per measured request
                      (t_s when it was sent; status 0: no answer)
        proc.csv      t_s,rss_mib,hwm_mib,threads,open_files,children, ~200 ms
        sampler.json  the sampler's own account (interval, CPU time)
        server.log    the server's output (and ai-stub.log when one ran)

The label adds what else sets a run apart: ``+arena-2``
(``--malloc-arena-max``), ``+trim-N``,
``+mmap-N`` (``--malloc-mmap-threshold``), ``+cap-MiB`` (``--memory-limit``),
``+pool-SIZING``; the summary compares runs by label. Times count from the
launch of the server process. ``--variant`` takes
several variants (``naive,optimized`` or repeated); with ``--repeat N`` they
run interleaved, A B A B ..., so drift of the machine falls on both alike.
After the runs, ``OUT/summary.json`` and ``summary.md`` compare them.

run.json keys: ``scenario``, ``variant``, ``naive_patterns``, ``label``,
``preset``, ``repeat`` (this run's index, from 1) and ``repeats``, ``load``
(``requests``, ``concurrency``, ``warmup``, ``timeout_s``, ``tail_s``,
``weights`` and the scenario's sizes), ``rss_mib`` (``baseline``,
``after_warmup``, ``peak`` - the highest sample from the ready server to the
end of the tail - ``startup_peak``, ``end``, ``hwm`` - the kernel's VmHWM
read after the tail, start-up included - and ``growth`` = peak - baseline),
``requests`` (``ok``,
``failed``, ``by_status``, ``by_route``, ``errors``, ``planned``, ``sent``,
``not_sent``), ``warmup``, ``latency_ms`` (``p50``, ``p95``, ``p99``,
``max``, ``mean``, over the requests answered as expected),
``throughput_rps`` (expected answers per second of the measured load),
``duration_s`` (of the measured load), ``sampler`` (``interval_ms``
achieved, ``samples``, ``cpu_s``), ``crashed``, ``exit_code``,
``interrupted``, ``memory_limit_mib`` and ``memory_limit`` (mechanism,
whether it killed), ``release_mib`` (``as_is``, ``after_gc``,
``after_trim``), ``database`` (engines and connections the server counted),
``process`` (threads and open files, max and end), ``trend`` (RSS, threads
and open files per 1,000 requests during the load), ``phases`` (start and
end of each phase), ``leftover_processes``, ``environment``.

From Python (a notebook)::

    from benchmarks import runner, summary
    runs = runner.run_scenario("listing", ["naive", "optimized"], "ci", repeat=3,
                               out="results", overrides={"concurrency": 4})
    runs[0].path, runs[0].data["rss_mib"]["peak"]
    summary.compare(runs)
    runner.load_runs("results/listing")   # every run.json under a folder

``overrides`` replace keys of the preset's load (``requests``,
``concurrency``, ``warmup``, ``timeout_s``, ``tail_s``, ``baseline_s``,
``upload_mib``, ``images``, ``image_mib``, ``body_mib``, ``weights.ROUTE``),
as ``--set KEY=VALUE`` does on the command line. To vary the dataset
(patients, images per patient, image sizes), build one with ``membench
dataset build`` and pass its folder as ``dataset=`` / ``--dataset``.

Limitations, and when they go away:

- A load that reaches its ``timeout_s`` cancels what is in flight on the
  client side only: the server goes on computing those requests, so the
  tail, ``end`` and ``release_mib`` of such a run include that work
  (``requests.errors`` then counts ``Cancelled``). The presets are
  calibrated so their loads end well within their timeouts.
- ``VmHWM`` is updated by the kernel from its per-CPU batched RSS counters,
  so a 10 ms sample can read up to a fraction of a MiB above it
  (``benchmarks/instrument_bench.py`` measures this); ``hwm`` is at least
  the sampled ``peak`` within that slack.
- With ``--db URL`` the runs write into that database: uploads and the
  images the diagnosis setup uploads stay there. On the default SQLite
  dataset every run serves its own copy instead.
- The memory cap is enforced by the sampler (a SIGKILL within one 10 ms tick
  of crossing it) rather than by a cgroup, which needs a delegated cgroup v2
  memory controller these machines do not have; a server allocating faster
  than ~100 MiB per tick can overshoot the cap by that much.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import scenarios
from benchmarks.harness import (
    MEMORY_LIMIT_MECHANISMS,
    EventFn,
    Options,
    RunResult,
    RunSpec,
    measure,
)
from benchmarks.workspace import Workspace
from reference_impl.config import parse_patterns
from reference_impl.errors import UsageError
from reference_impl.patterns.client import pool_options
from reference_impl.presets import PRESET_NAMES, default_dataset_dir, load_preset

log = logging.getLogger("benchmarks")

VARIANTS = ("naive", "optimized", "optimized-plus")
DEFAULT_OUT = Path("results")

__all__ = ["RunResult", "load_runs", "run_scenario"]


def parse_variants(values: str | Sequence[str] | None) -> list[str]:
    """``"naive,optimized"`` or ``["naive", "optimized"]`` -> the list, checked."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        for name in item.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in VARIANTS:
                raise UsageError(
                    f"unknown variant {name!r}; known: {', '.join(VARIANTS)}"
                )
            if name not in out:
                out.append(name)
    return out


def parse_scenarios(text: str | Sequence[str]) -> list[str]:
    items = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in items:
        for name in item.split(","):
            name = name.strip()
            if name == "all":
                names += [s for s in scenarios.SCENARIOS if s != "soak"]
            elif name:
                scenarios.scenario(name)
                names.append(name)
    if not names:
        raise UsageError("no scenario named")
    return list(dict.fromkeys(names))


def parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r} is not KEY=VALUE")
        out[key.strip()] = parse_value(value.strip())
    return out


def interleave(
    scenario_names: Sequence[str],
    variants: Sequence[str],
    naive: Sequence[str],
    repeat: int,
) -> list[RunSpec]:
    """Runs in the order they are measured: per scenario, A B A B ..."""
    specs = []
    for name in scenario_names:
        for k in range(1, repeat + 1):
            for variant in variants:
                specs.append(
                    RunSpec(
                        name,
                        variant,
                        tuple(naive) if variant != "naive" else (),
                        k,
                        repeat,
                    )
                )
    return specs


def ensure_dataset(preset: str, dataset: Path | None, db_url: str | None) -> Path:
    """The dataset folder to serve, built first when it is missing."""
    folder = Path(dataset) if dataset is not None else default_dataset_dir(preset)
    if not (folder / "manifest.json").is_file():
        from reference_impl import datagen

        log.info("building the %s dataset in %s first", preset, folder)
        datagen.build(preset=preset, out=folder, db_url=db_url)
    return folder


def run_scenario(
    scenario: str | Sequence[str],
    variant: str | Sequence[str] = ("naive", "optimized"),
    preset: str = "ci",
    *,
    naive: Sequence[str] = (),
    out: str | Path = DEFAULT_OUT,
    repeat: int = 1,
    overrides: dict[str, Any] | None = None,
    dataset: str | Path | None = None,
    db: str | None = None,
    memory_limit_mib: float | None = None,
    memory_limit_via: str = "watchdog",
    malloc_arena_max: int | None = None,
    malloc_trim_threshold: int | None = None,
    malloc_mmap_threshold: int | None = None,
    seed: int = 0,
    interval_ms: float = 10.0,
    keep: bool = False,
    write_summary: bool = True,
    on_event: EventFn | None = None,
    pool_size: str | None = None,
) -> list[RunResult]:
    """Measure ``scenario`` for each variant, ``repeat`` times interleaved.

    ``scenario`` and ``variant`` take one name, a comma-separated list or a
    sequence. Returns one :class:`RunResult` per run (``.path``: the run
    folder, ``.data``: its run.json), in the order they ran. With
    ``write_summary`` the comparison lands in ``out``/summary.json and .md.
    ``on_event(phase, info)`` is called as each phase of a run starts
    (``info["pid"]`` is the server's pid once it runs). ``pool_size`` sizes
    the server's database pool (``sqlalchemy``, ``prisma`` or a number).
    """
    if repeat < 1:
        raise UsageError(f"repeat={repeat} must be at least 1")
    if memory_limit_via not in MEMORY_LIMIT_MECHANISMS:
        raise UsageError(
            f"memory_limit_via={memory_limit_via!r} is not one of "
            f"{', '.join(MEMORY_LIMIT_MECHANISMS)}"
        )
    if memory_limit_mib is not None and memory_limit_mib <= 0:
        raise UsageError(f"memory limit {memory_limit_mib} MiB must be above 0")
    # httpx logs every request at INFO: thousands of lines per load.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    names = parse_scenarios(scenario)
    variants = parse_variants(variant)
    if not variants:
        raise UsageError("no variant named")
    naive_patterns = tuple(sorted(parse_patterns(",".join(naive))))
    if pool_size is not None:
        pool_options(pool_size)  # a bad sizing fails before any server starts
    out_dir = Path(out)
    options = Options(
        preset=load_preset(preset),
        out=out_dir,
        dataset=ensure_dataset(preset, Path(dataset) if dataset else None, db),
        db_url=db,
        overrides=dict(overrides or {}),
        memory_limit_mib=memory_limit_mib,
        memory_limit_via=memory_limit_via,
        malloc_arena_max=malloc_arena_max,
        malloc_trim_threshold=malloc_trim_threshold,
        malloc_mmap_threshold=malloc_mmap_threshold,
        seed=seed,
        interval_ms=interval_ms,
        keep=keep,
        on_event=on_event,
        pool_size=pool_size,
    )
    for name in names:
        options.load_for(name)  # a missing load or a bad override fails early
    specs = interleave(names, variants, naive_patterns, repeat)
    out_dir.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(options.dataset, options.preset, options.out, options.db_url)
    results: list[RunResult] = []
    try:
        for spec in specs:
            results.append(measure(spec, workspace, options))
    finally:
        workspace.close()
        if write_summary and results:
            from benchmarks import summary

            summary.write(out_dir, summary.compare(results))
    return results


def load_runs(folder: str | Path) -> list[RunResult]:
    """Every run under ``folder`` (searched recursively), oldest first."""
    paths = sorted(Path(folder).rglob("run.json"), key=lambda p: p.stat().st_mtime)
    return [RunResult.load(p.parent) for p in paths]


# -- command line -------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "scenario",
        metavar="SCENARIO",
        help=f"one of {', '.join(scenarios.SCENARIOS)}; several comma-separated, "
        "or 'all' (every one but soak)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        metavar="VARIANT[,VARIANT...]",
        help=f"{', '.join(VARIANTS)}; several run interleaved "
        "(default: naive,optimized; soak: optimized)",
    )
    parser.add_argument(
        "--naive", metavar="PATTERN,...", help="patterns kept naive in optimized runs"
    )
    parser.add_argument("--preset", default="ci", help=f"{', '.join(PRESET_NAMES)}")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (results/)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant")
    parser.add_argument("--db", metavar="URL", help="serve this database instead")
    parser.add_argument(
        "--dataset",
        type=Path,
        metavar="DIR",
        help="dataset folder (default datasets/PRESET, built when missing)",
    )
    parser.add_argument(
        "--memory-limit", type=float, metavar="MiB", help="cap the server's memory"
    )
    parser.add_argument(
        "--memory-limit-via",
        choices=MEMORY_LIMIT_MECHANISMS,
        default="watchdog",
        help="how the cap is enforced (default: watchdog, an OOM kill at the cap)",
    )
    parser.add_argument(
        "--malloc-arena-max", type=int, metavar="N", help="MALLOC_ARENA_MAX"
    )
    parser.add_argument(
        "--malloc-trim-threshold",
        type=int,
        metavar="BYTES",
        help="MALLOC_TRIM_THRESHOLD_",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        metavar="BYTES",
        help="MALLOC_MMAP_THRESHOLD_ (fixed: glibc then stops raising it)",
    )
    parser.add_argument("--requests", type=int, help="measured requests")
    parser.add_argument("--concurrency", type=int, help="requests in flight")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the preset's load (upload_mib=4, weights.upload=0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request plan")
    parser.add_argument(
        "--interval-ms", type=float, default=10.0, help="RSS sampling interval"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep each run's database copy"
    )
    parser.add_argument(
        "--pool-size",
        metavar="SIZING",
        help="the server's database pool: sqlalchemy, prisma or a number"
        " (see membench serve --help)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_sets(args.set)
    if args.requests is not None:
        overrides["requests"] = args.requests
    if args.concurrency is not None:
        overrides["concurrency"] = args.concurrency
    return overrides


def _default_variants(names: Sequence[str]) -> list[str]:
    if all(scenarios.scenario(n).default_variants == ("optimized",) for n in names):
        return ["optimized"]
    return ["naive", "optimized"]


def print_table(results: Sequence[RunResult], file=sys.stdout) -> None:
    header = (
        f"{'scenario':<11} {'run':<28} {'base':>7} {'peak':>8} {'hwm':>8} "
        f"{'end':>8} {'trim':>7} {'req/s':>7} {'p99 ms':>8} {'ok':>6} "
        f"{'fail':>5} crash"
    )
    print(header, file=file)
    for result in results:
        d = result.data
        rss = d["rss_mib"]
        release = d.get("release_mib") or {}

        def num(value, digits=1, width=8):
            return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

        print(
            f"{d['scenario']:<11} {d['label'] + ' r' + str(d['repeat']):<28} "
            f"{num(rss['baseline'], width=7)} {num(rss['peak'])} {num(rss['hwm'])} "
            f"{num(rss['end'])} {num(release.get('after_trim'), width=7)} "
            f"{num(d['throughput_rps'], width=7)} {num(d['latency_ms']['p99'])} "
            f"{d['requests']['ok']:>6} {d['requests']['failed']:>5} "
            f"{'yes' if d['crashed'] else 'no'}",
            file=file,
        )


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    if args.quiet:
        log.setLevel(logging.WARNING)
    names = parse_scenarios(args.scenario)
    variants = parse_variants(args.variant) or _default_variants(names)
    # A SIGTERM stops the runs as Ctrl-C does: servers stopped, files written.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = run_scenario(
            names,
            variants,
            args.preset,
            naive=tuple(parse_patterns(args.naive)),
            out=args.out,
            repeat=args.repeat,
            overrides=_overrides(args),
            dataset=args.dataset,
            db=args.db,
            memory_limit_mib=args.memory_limit,
            memory_limit_via=args.memory_limit_via,
            malloc_arena_max=args.malloc_arena_max,
            malloc_trim_threshold=args.malloc_trim_threshold,
            malloc_mmap_threshold=args.malloc_mmap_threshold,
            seed=args.seed,
            interval_ms=args.interval_ms,
            keep=args.keep,
            pool_size=args.pool_size,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_table(results)
    if len(results) > 1:
        print(f"\nsummary: {args.out / 'summary.md'}")
    failed = any(r.data["error"] for r in results)
    return 1 if failed else 0
