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
    kernel's exact peak, ``rss_mib.hwm``), then ``POST /debug/release``:
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
that. A cgroup's ``memory.max`` is not used: the machines this suite runs on
expose only a cgroup v1 memory controller owned by the host's own process
manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import logging
import os
import random
import resource
import shutil
import sqlite3
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import environment, load, scenarios
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
#: The patient the encoding setup uploads its images to.
DIAGNOSIS_PATIENT = 1
#: The patient given a long imaging history when a load sets
#: ``patient_images``.
HISTORY_PATIENT = 2
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

    def server_env(self, marker: str) -> dict[str, str]:
        env = {RUN_MARKER_ENV: marker}
        if self.malloc_arena_max is not None:
            env["MALLOC_ARENA_MAX"] = str(self.malloc_arena_max)
        if self.malloc_trim_threshold is not None:
            env["MALLOC_TRIM_THRESHOLD_"] = str(self.malloc_trim_threshold)
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


# -- the shared workspace of an invocation ----------------------------------


def read_manifest(dataset: Path) -> dict[str, Any]:
    path = dataset / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{dataset} holds no manifest.json")
    return json.loads(path.read_text())


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy, whatever the source's journal (WAL included)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source_uri = f"file:{source}?mode=ro"
    with (
        contextlib.closing(sqlite3.connect(source_uri, uri=True)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


def link_tree(source: Path, target: Path) -> int:
    """``target`` mirrors ``source`` with a symlink per file; the files linked."""
    count = 0
    for root, _dirs, files in os.walk(source):
        rel = Path(root).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / rel / name).symlink_to(Path(root, name).resolve())
            count += 1
    target.mkdir(parents=True, exist_ok=True)
    return count


_IMAGE_CACHE: dict[tuple[int, int, str], bytes] = {}


def image_of_size(size_bytes: int, seed: int, kind: str = "panoramic") -> bytes:
    """A real image of about ``size_bytes`` (never more), made once a process."""
    key = (size_bytes, seed, kind)
    if key not in _IMAGE_CACHE:
        from reference_impl.imagegen import make_image_of_size

        rng = random.Random(seed)
        # The generator lands within ~10% of its target: aim below, so the
        # file stays within the size the preset names (and the server's limit).
        target = int(size_bytes * 0.93)
        data = make_image_of_size(target, rng, kind=kind)
        while len(data) > size_bytes:
            target = int(target * 0.9)
            data = make_image_of_size(target, rng, kind=kind)
        _IMAGE_CACHE[key] = data
    return _IMAGE_CACHE[key]


class Workspace:
    """The dataset as runs use it: one private base copy per invocation.

    Runs that write (uploads) must not grow the shared dataset, and a server
    that opens an SQLite file switches it to WAL, so every run serves its own
    copy of the database and a storage folder of symlinks to the dataset's
    images, both under the run folder and removed after the run. The images
    a diagnosis needs are uploaded once, into the base copy, by a short-lived
    optimized server.
    """

    def __init__(self, options: Options) -> None:
        self.options = options
        self.dataset = options.dataset
        self.manifest = read_manifest(self.dataset)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.root = options.out / f".work-{stamp}-{os.getpid()}"
        self.base = self.root / "base"
        self._diagnosis: dict[tuple[int, float], list[int]] = {}
        self._setups: dict[tuple[str, int], int] = {}
        self._prepared = False

    # The dataset's own locations.
    @property
    def external_db(self) -> str | None:
        return self.options.db_url or self.manifest.get("db_url")

    @property
    def dataset_db(self) -> Path:
        return self.dataset / self.manifest["database"]

    @property
    def dataset_images(self) -> Path:
        return self.dataset / self.manifest["images"]

    @property
    def base_db(self) -> Path:
        return self.base / "clinic.sqlite"

    @property
    def base_storage(self) -> Path:
        return self.base / "storage"

    def prepare(self) -> None:
        if self._prepared:
            return
        self.base.mkdir(parents=True, exist_ok=True)
        if self.external_db is None:
            copy_sqlite(self.dataset_db, self.base_db)
        link_tree(self.dataset_images, self.base_storage)
        self._prepared = True

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def scratch_for(self, run_dir: Path) -> tuple[str, Path]:
        """A private database URL and storage folder for one run."""
        self.prepare()
        scratch = run_dir / "scratch"
        storage = scratch / "storage"
        link_tree(self.base_storage, storage)
        if self.external_db is not None:
            return self.external_db, storage
        db = scratch / "clinic.sqlite"
        copy_sqlite(self.base_db, db)
        return f"sqlite+aiosqlite:///{db.resolve()}", storage

    def counts(self) -> dict[str, Any]:
        counts = dict(self.manifest.get("counts") or {})
        ds = self.options.preset.dataset
        counts.setdefault("patients", ds.get("patients", 1))
        counts.setdefault(
            "invoices", ds.get("patients", 1) * ds.get("invoices_per_patient", 1)
        )
        return counts

    def currencies(self) -> list[str]:
        listed = (self.manifest.get("parameters") or {}).get(
            "currencies"
        ) or self.options.preset.dataset.get("currencies")
        base = self.manifest.get("base_currency")
        return [c for c in (listed or ["USD"]) if c != base] or ["USD"]

    def login(self) -> tuple[str, str]:
        creds = self.manifest.get("login") or {}
        return creds.get("email", ""), creds.get("password", "")

    def diagnosis_images(self, count: int, image_mib: float) -> list[int]:
        """Ids of ``count`` images of ``image_mib`` uploaded to the base copy."""
        key = (count, image_mib)
        if key in self._diagnosis:
            return self._diagnosis[key]
        self.prepare()
        db_url = self.external_db or f"sqlite+aiosqlite:///{self.base_db.resolve()}"
        port = free_port()
        command = serve_args(
            "optimized", port=port, db=db_url, storage=self.base_storage
        )
        log.info("setup: uploading %s images of %s MiB", count, image_mib)
        ids = []
        kinds = ("panoramic", "cephalometric", "bitewing")
        with (
            ServerProcess(
                command, port=port, log_path=self.root / "setup-server.log"
            ) as server,
            httpx.Client(base_url=server.base_url, timeout=120, trust_env=False) as c,
        ):
            for i in range(count):
                kind = kinds[i % len(kinds)]
                data = image_of_size(int(image_mib * MIB), seed=1000 + i, kind=kind)
                answer = c.post(
                    f"/api/patients/{DIAGNOSIS_PATIENT}/images",
                    files={"file": (f"setup-{i}.jpg", data, "image/jpeg")},
                    data={"kind": kind},
                )
                if answer.status_code != 201:
                    raise ServerError(
                        f"setup upload {i} answered {answer.status_code}: "
                        f"{answer.text[:300]}"
                    )
                ids.append(int(answer.json()["id"]))
        self._diagnosis[key] = ids
        return ids

    def patient_with_history(self, count: int) -> int:
        """A patient holding ``count`` image rows, made in the base copy.

        The rows are copies of the dataset's own (their analysis documents
        included), added to one patient: a patient with a long imaging
        history, whose image list is what the ``images`` pattern reads.
        """
        key = ("history", count)
        if key not in self._setups:
            self.prepare()
            db_url = self.external_db or f"sqlite+aiosqlite:///{self.base_db}"
            added = asyncio.run(_add_history(db_url, HISTORY_PATIENT, count))
            log.info(
                "setup: patient %s holds %s images (%s added)",
                HISTORY_PATIENT,
                count,
                added,
            )
            self._setups[key] = HISTORY_PATIENT
        return self._setups[key]

    def context(self, scenario: str, load_: dict[str, Any]) -> scenarios.Context:
        weights = scenarios.weights_for(scenario, load_)
        counts = self.counts()
        email, password = self.login()
        ctx = scenarios.Context(
            patients=int(counts["patients"]),
            invoices=int(counts["invoices"]),
            currencies=self.currencies(),
            email=email,
            password=password,
        )
        if "upload" in weights:
            size = int(float(load_["upload_mib"]) * MIB)
            ctx.upload_file = (
                "radiograph.jpg",
                image_of_size(size, seed=7),
                "image/jpeg",
            )
        if "oversized_body" in weights:
            size = int(float(load_["body_mib"]) * MIB)
            ctx.oversized_json = scenarios.oversized_login(email, password, size)
        if load_.get("patient_images"):
            ctx.history_patient = self.patient_with_history(
                int(load_["patient_images"])
            )
        if "diagnosis" in weights:
            ctx.diagnosis_patient = DIAGNOSIS_PATIENT
            ctx.diagnosis_images = self.diagnosis_images(
                int(load_["images"]), float(load_["image_mib"])
            )
        return ctx


async def _add_history(db_url: str, patient_id: int, count: int) -> int:
    """Copy image rows to ``patient_id`` until it holds ``count``; rows added."""
    from sqlalchemy import func, select
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from reference_impl.models import RadiologyImage

    columns = [
        c.key
        for c in RadiologyImage.__table__.columns
        if c.key not in ("id", "patient_id")
    ]
    engine = create_async_engine(db_url)
    try:
        async with AsyncSession(engine) as session:
            held = await session.scalar(
                select(func.count(RadiologyImage.id)).where(
                    RadiologyImage.patient_id == patient_id
                )
            )
            missing = max(0, count - int(held or 0))
            sources = list(
                await session.scalars(
                    select(RadiologyImage)
                    .where(RadiologyImage.patient_id != patient_id)
                    .order_by(RadiologyImage.id)
                    .limit(missing)
                )
            )
            if missing and not sources:
                raise UsageError("the dataset holds no image rows to copy")
            for i in range(missing):
                source = sources[i % len(sources)]
                values = {name: getattr(source, name) for name in columns}
                session.add(RadiologyImage(patient_id=patient_id, **values))
            await session.commit()
    finally:
        await engine.dispose()
    return missing


# -- one run ----------------------------------------------------------------


def _rlimit_preexec(kind: str, limit_bytes: int) -> Callable[[], None]:
    which = resource.RLIMIT_AS if kind == "rlimit-as" else resource.RLIMIT_DATA

    def apply() -> None:
        resource.setrlimit(which, (limit_bytes, limit_bytes))

    return apply


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


def run_folder(out: Path, spec: RunSpec) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    base = out / spec.scenario / f"{spec.label}-r{spec.repeat}-{stamp}"
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

    run_dir = run_folder(options.out, spec)
    tag = f"[{spec.scenario} {spec.label} r{spec.repeat}/{spec.repeats}]"
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

    data = _run_json(
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


def _run_json(
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
        hwm_source = "last VmHWM read before the server died (or the sampled peak)"

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
        "label": spec.label,
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
        "db": "external" if options.db_url else "sqlite copy",
        "environment": environment.describe(env),
    }
    if pg is not None:
        with contextlib.suppress(Exception):
            pg.write_csv(run_dir / "pg.csv")
            data["db_server"] = pg.summary()
    return data


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
        import bisect

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


def check_memory_limit_via(value: str) -> str:
    if value not in MEMORY_LIMIT_MECHANISMS:
        raise UsageError(
            f"--memory-limit-via {value!r} is not one of "
            f"{', '.join(MEMORY_LIMIT_MECHANISMS)}"
        )
    return value
