"""One measured run: a fresh server, its load, its samples, its run folder.

``measure(spec, workspace, options)`` goes through these phases, each logged
as it starts and timed in run.json's ``phases`` (seconds since t0, the
moment the server process was launched, the zero of rss.csv and
latency.csv):

``startup``
    the AI stand-in (when the mix asks for diagnoses), then the server in its
    own session, under a memory cap if one is asked; the sampler process
    starts on the server's pid at once, so start-up is sampled too.
``baseline``
    the idle, ready server; ``rss_mib.baseline`` is the median sample here.
``warmup``
    ``warmup`` requests of the same mix; counted in run.json, not in
    latency.csv.
``load``
    the measured requests; every one a row of latency.csv.
``tail``
    ``tail_s`` seconds of idle sampling; ``rss_mib.end`` is the median of
    its last second (or half, if shorter): what stays resident.
``probe``
    ``/debug/stats`` (engines, connections), the server's ``VmHWM`` (the
    kernel's own peak, start-up included, ``rss_mib.hwm``), then
    ``POST /debug/release``:
    RSS as is, after ``gc.collect()``, after ``malloc_trim(0)``.
``stop``
    sampler, server and stand-in stopped by process group; anything still
    carrying the run's marker in its environment is killed and counted in
    ``leftover_processes`` (0 unless something went wrong).

A server that dies keeps its samples and is recorded with ``crashed: true``
and its exit code; the phases after its death are skipped. Ctrl-C stops the
run the same way, writes what was measured with ``interrupted: true``, and
is raised again.

Memory caps (``memory_limit_mib``): ``watchdog`` (the default) has the
sampler kill the server's process group with SIGKILL once the server and its
children hold more than the cap, as a container's out-of-memory killer does;
it needs no privileges and works on any Linux. ``rlimit-as`` and
``rlimit-data`` set ``RLIMIT_AS`` / ``RLIMIT_DATA`` instead, which count
address space (thread stacks, malloc arenas) rather than resident memory, so
a Python server fails them far below the cap's RSS: they are kept to show
that (at the ``ci`` preset under ``RLIMIT_AS`` of 400 MiB the naive upload
server answered 500 with MemoryError, then stopped answering, at 146 MiB
resident). A cgroup's ``memory.max`` is not used: the machines this suite runs on
expose only a cgroup v1 memory controller owned by the host's own process
manager.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import resource
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import load, scenarios
from benchmarks.runfiles import run_json, write_latency_csv
from benchmarks.sampler import SamplerProcess, hwm_mib
from benchmarks.serverproc import (
    RUN_MARKER_ENV,
    ServerError,
    ServerProcess,
    free_port,
    kill_marked,
    membench_command,
    serve_args,
)
from benchmarks.workspace import Workspace
from reference_impl.errors import UsageError
from reference_impl.presets import Preset

log = logging.getLogger("benchmarks")

MIB = 1024 * 1024
MEMORY_LIMIT_MECHANISMS = ("watchdog", "rlimit-as", "rlimit-data")
#: Keys every load of presets.toml has, with the value used when one is missing.
LOAD_DEFAULTS: dict[str, Any] = {
    "requests": 100,
    "concurrency": 4,
    "warmup": 0,
    "timeout_s": 300.0,
    "tail_s": 1.0,
    "baseline_s": 0.5,
    "upload_mib": 1.0,
    "images": 5,
    "image_mib": 1.0,
    "body_mib": 2.0,
    "patient_images": 0,
}
#: Seconds a server gets to answer /healthz after it is launched.
START_TIMEOUT_S = 120.0

EventFn = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class RunSpec:
    """Which run: a scenario, a variant and its repeat index."""

    scenario: str
    variant: str
    naive: tuple[str, ...] = ()
    repeat: int = 1
    repeats: int = 1

    @property
    def label(self) -> str:
        """``naive``, ``optimized``, ``optimized+naive-client-upload``."""
        if self.naive and self.variant != "naive":
            return f"{self.variant}+naive-{'-'.join(self.naive)}"
        return self.variant


@dataclass
class Options:
    """What every run of one invocation shares."""

    preset: Preset
    out: Path
    dataset: Path
    db_url: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    memory_limit_mib: float | None = None
    memory_limit_via: str = "watchdog"
    malloc_arena_max: int | None = None
    malloc_trim_threshold: int | None = None
    malloc_mmap_threshold: int | None = None
    seed: int = 0
    interval_ms: float = 10.0
    proc_interval_ms: float = 200.0
    keep: bool = False
    on_event: EventFn | None = None
    #: The server's database pool sizing (``membench serve --pool-size``).
    pool_size: str | None = None

    def load_for(self, scenario: str) -> dict[str, Any]:
        """The preset's load of ``scenario`` with the overrides applied."""
        merged = {**LOAD_DEFAULTS, **self.preset.load(scenario)}
        weights = dict(merged.get("weights") or {})
        for key, value in self.overrides.items():
            if key.startswith("weights."):
                weights[key.removeprefix("weights.")] = value
            else:
                merged[key] = value
        if weights:
            merged["weights"] = weights
        for key in ("requests", "concurrency", "warmup", "images"):
            merged[key] = int(merged[key])
            if merged[key] < (1 if key == "concurrency" else 0):
                raise UsageError(f"{key}={merged[key]} must not be negative or zero")
        return merged

    def label_suffix(self) -> str:
        """What sets these runs apart beyond the variant, for labels and folders:
        ``+arena-2``, ``+trim-131072``, ``+mmap-131072``, ``+cap-1024``,
        ``+pool-prisma``."""
        parts = []
        if self.malloc_arena_max is not None:
            parts.append(f"+arena-{self.malloc_arena_max}")
        if self.malloc_trim_threshold is not None:
            parts.append(f"+trim-{self.malloc_trim_threshold}")
        if self.malloc_mmap_threshold is not None:
            parts.append(f"+mmap-{self.malloc_mmap_threshold}")
        if self.memory_limit_mib is not None:
            parts.append(f"+cap-{self.memory_limit_mib:g}")
        if self.pool_size is not None:
            parts.append(f"+pool-{self.pool_size}")
        return "".join(parts)

    def server_env(self, marker: str) -> dict[str, str]:
        env = {RUN_MARKER_ENV: marker}
        if self.malloc_arena_max is not None:
            env["MALLOC_ARENA_MAX"] = str(self.malloc_arena_max)
        if self.malloc_trim_threshold is not None:
            env["MALLOC_TRIM_THRESHOLD_"] = str(self.malloc_trim_threshold)
        if self.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(self.malloc_mmap_threshold)
        return env


@dataclass(frozen=True)
class RunResult:
    """A finished run: its folder and its run.json as a dict."""

    path: Path
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @classmethod
    def load(cls, path: Path) -> RunResult:
        path = Path(path)
        return cls(path, json.loads((path / "run.json").read_text()))


# -- one run ----------------------------------------------------------------


def _rlimit_preexec(kind: str, limit_bytes: int) -> Callable[[], None]:
    which = resource.RLIMIT_AS if kind == "rlimit-as" else resource.RLIMIT_DATA

    def apply() -> None:
        resource.setrlimit(which, (limit_bytes, limit_bytes))

    return apply


class _Phases:
    def __init__(self, t0: float, tag: str, on_event: EventFn | None) -> None:
        self.t0 = t0
        self.tag = tag
        self.on_event = on_event
        self.spans: dict[str, dict[str, float]] = {}
        self.current: str | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, name: str, message: str = "", **info: Any) -> None:
        self.end()
        self.current = name
        self.spans[name] = {"start_s": round(self.now(), 4)}
        log.info("%s %s%s", self.tag, name, f": {message}" if message else "")
        if self.on_event is not None:
            self.on_event(name, info)

    def end(self) -> None:
        if self.current is not None:
            span = self.spans[self.current]
            span["end_s"] = round(self.now(), 4)
            span["duration_s"] = round(span["end_s"] - span["start_s"], 4)
            self.current = None


def _progress_logger(tag: str, t0: float, started: float) -> load.ProgressFn:
    def report(done: int, planned: int, no_answer: int) -> None:
        elapsed = time.monotonic() - t0 - started
        rate = done / elapsed if elapsed > 0 else 0.0
        log.info(
            "%s load %3d%% (%d/%d) %.1f req/s, %d without answer",
            tag,
            round(100 * done / planned),
            done,
            planned,
            rate,
            no_answer,
        )

    return report


def run_folder(out: Path, spec: RunSpec, label: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    base = out / spec.scenario / f"{label}-r{spec.repeat}-{stamp}"
    path = base
    n = 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def measure(spec: RunSpec, workspace: Workspace, options: Options) -> RunResult:
    """Run ``spec`` once against a fresh server; see the module docstring."""
    load_ = options.load_for(spec.scenario)
    weights = scenarios.weights_for(spec.scenario, load_)
    ctx = workspace.context(spec.scenario, load_)
    seed = options.seed
    rng = random.Random(f"{seed}:{spec.scenario}")
    warmup_plan = scenarios.build_plan(weights, load_["warmup"], rng, ctx)
    plan = scenarios.build_plan(weights, load_["requests"], rng, ctx)

    label = spec.label + options.label_suffix()
    run_dir = run_folder(options.out, spec, label)
    tag = f"[{spec.scenario} {label} r{spec.repeat}/{spec.repeats}]"
    db_url, storage = workspace.scratch_for(run_dir)
    marker = uuid.uuid4().hex
    env = options.server_env(marker)
    limit = options.memory_limit_mib
    via = options.memory_limit_via if limit is not None else None
    preexec = None
    if limit is not None and via in ("rlimit-as", "rlimit-data"):
        preexec = _rlimit_preexec(via, int(limit * MIB))

    ai: ServerProcess | None = None
    server: ServerProcess | None = None
    sampler: SamplerProcess | None = None
    pg = None
    warm = load.LoadResult(planned=len(warmup_plan))
    measured = load.LoadResult(planned=len(plan))
    sampler_summary: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    release: dict[str, Any] | None = None
    hwm_end: float | None = None
    crashed_before_stop = False
    exit_code: int | None = None
    interrupted = False
    error: str | None = None
    leftovers: list[int] = []
    pids: dict[str, int | None] = {}

    t0 = time.monotonic()
    phases = _Phases(t0, tag, options.on_event)
    try:
        phases.start("startup", f"{options.preset.name} preset, {run_dir}")
        if "diagnosis" in weights:
            ai_port = free_port()
            ai = ServerProcess(
                membench_command("ai-stub", "--port", str(ai_port)),
                port=ai_port,
                env={RUN_MARKER_ENV: marker},
                log_path=run_dir / "ai-stub.log",
            ).start(START_TIMEOUT_S)
        port = free_port()
        server = ServerProcess(
            serve_args(
                spec.variant,
                port=port,
                naive=spec.naive,
                db=db_url,
                storage=storage,
                ai_url=f"{ai.base_url}/v1" if ai is not None else None,
                extra=("--pool-size", options.pool_size) if options.pool_size else (),
            ),
            port=port,
            env=env,
            log_path=run_dir / "server.log",
            preexec_fn=preexec,
        )
        server.launch()
        sampler = SamplerProcess(
            server.pid,
            run_dir,
            t0=t0,
            interval_ms=options.interval_ms,
            proc_interval_ms=options.proc_interval_ms,
            limit_mib=limit if via == "watchdog" else None,
            env={RUN_MARKER_ENV: marker},
        ).start()
        server.wait_ready(START_TIMEOUT_S)
        phases.start("baseline", f"server pid {server.pid} ready", pid=server.pid)
        if db_url.startswith("postgres"):
            pg = _start_pg_sampler(db_url, t0)
        _idle(server, float(load_["baseline_s"]))

        if warmup_plan and server.alive():
            phases.start("warmup", f"{len(warmup_plan)} requests", pid=server.pid)
            _drive(server, warmup_plan, load_, t0, warm)

        if server.alive():
            phases.start(
                "load",
                f"{len(plan)} requests at concurrency {load_['concurrency']}",
                pid=server.pid,
            )
            every = max(1, len(plan) // 10)
            progress = _progress_logger(tag, t0, phases.now())
            _drive(server, plan, load_, t0, measured, progress, every)

        if server.alive():
            phases.start("tail", f"{load_['tail_s']} s idle", pid=server.pid)
            _idle(server, float(load_["tail_s"]))

        if server.alive():
            phases.start("probe", "stats, VmHWM, release", pid=server.pid)
            stats, hwm_end, release = _probe(server)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("%s interrupted: stopping and writing what was measured", tag)
    except (ServerError, OSError, RuntimeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("%s %s", tag, error)
    finally:
        phases.start("stop")
        if server is not None and server.proc is not None:
            crashed_before_stop = server.proc.poll() is not None
        if sampler is not None:
            sampler_summary = sampler.stop()
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.stop()
        if server is not None:
            exit_code = server.stop()
        if ai is not None:
            ai.stop()
        leftovers = kill_marked(marker)
        phases.end()
        pids = {
            "server": server.proc.pid if server and server.proc else None,
            "sampler": sampler.proc.pid if sampler and sampler.proc else None,
            "ai_stub": ai.proc.pid if ai and ai.proc else None,
        }
        if leftovers:
            log.warning("%s killed %d leftover process(es)", tag, len(leftovers))

    data = run_json(
        spec=spec,
        options=options,
        load_=load_,
        weights=weights,
        ctx=ctx,
        run_dir=run_dir,
        phases=phases,
        warm=warm,
        measured=measured,
        sampler_summary=sampler_summary,
        stats=stats,
        release=release,
        hwm_end=hwm_end,
        crashed=crashed_before_stop,
        exit_code=exit_code,
        interrupted=interrupted,
        error=error,
        leftovers=leftovers,
        pids=pids,
        env=env,
        pg=pg,
    )
    write_latency_csv(run_dir / "latency.csv", measured.records)
    (run_dir / "run.json").write_text(json.dumps(data, indent=2) + "\n")
    if not options.keep:
        shutil.rmtree(run_dir / "scratch", ignore_errors=True)
    if interrupted:
        raise KeyboardInterrupt
    return RunResult(run_dir, data)


def _start_pg_sampler(db_url: str, t0: float):
    from benchmarks.pgstats import PgSampler, PgStatsError

    try:
        return PgSampler(db_url, t0=t0).start()
    except PgStatsError as exc:
        log.warning("the PostgreSQL server is not sampled: %s", exc)
        return None


def _idle(server: ServerProcess, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.alive():
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _drive(
    server: ServerProcess,
    plan: list[load.Request],
    load_: dict[str, Any],
    t0: float,
    result: load.LoadResult,
    progress: load.ProgressFn | None = None,
    every: int | None = None,
) -> None:
    load.run(
        server.base_url,
        plan,
        concurrency=int(load_["concurrency"]),
        timeout_s=float(load_["timeout_s"]),
        t0=t0,
        request_timeout_s=min(300.0, float(load_["timeout_s"])),
        abort=lambda: not server.alive(),
        progress=progress,
        progress_every=every,
        result=result,
    )


def _probe(
    server: ServerProcess,
) -> tuple[dict[str, Any] | None, float | None, dict[str, Any] | None]:
    stats = release = None
    with httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as client:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            stats = client.get("/debug/stats").json()
        # Read before the release probe touches the heap.
        hwm = hwm_mib(server.pid)
        with contextlib.suppress(httpx.HTTPError, ValueError):
            release = client.post("/debug/release", params={"gc": 1, "trim": 1}).json()
    return stats, hwm, release
