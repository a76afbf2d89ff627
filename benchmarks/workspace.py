"""The dataset as runs use it: private copies, and what scenarios set up.

A run must neither grow the shared dataset (uploads write rows and files)
nor change it (a server that opens an SQLite file switches it to WAL). A
``Workspace`` makes one base copy per invocation (the database through
SQLite's backup API, the image folder as a tree of symlinks) and gives each
run its own copy of that base under the run folder. What a scenario needs
beyond the dataset is set up once, in the base:

- ``diagnosis_images``: images of a given size uploaded to patient 1 by a
  short-lived optimized server, so the diagnosis route finds them as the
  patient's most recent images;
- ``patient_with_history``: patient 2 given ``patient_images`` image rows,
  copies of the dataset's own with their analysis documents;
- the upload file and the oversized JSON body, made in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import scenarios
from benchmarks.serverproc import ServerError, ServerProcess, free_port, serve_args
from reference_impl.errors import UsageError
from reference_impl.presets import Preset
from reference_impl.server import sqlite_url

log = logging.getLogger("benchmarks")

MIB = 1024 * 1024
#: The patient the encoding setup uploads its images to.
DIAGNOSIS_PATIENT = 1
#: The patient given a long imaging history when a load sets
#: ``patient_images``.
HISTORY_PATIENT = 2


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

    def __init__(
        self, dataset: Path, preset: Preset, out: Path, db_url: str | None = None
    ) -> None:
        self.dataset = dataset
        self.preset = preset
        self.db_url = db_url
        self.manifest = read_manifest(self.dataset)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.root = out / f".work-{stamp}-{os.getpid()}"
        self.base = self.root / "base"
        self._diagnosis: dict[tuple[int, float], list[int]] = {}
        self._setups: dict[tuple[str, int], int] = {}
        self._prepared = False

    # The dataset's own locations.
    @property
    def external_db(self) -> str | None:
        return self.db_url or self.manifest.get("db_url")

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
        return sqlite_url(db), storage

    def counts(self) -> dict[str, Any]:
        counts = dict(self.manifest.get("counts") or {})
        ds = self.preset.dataset
        counts.setdefault("patients", ds.get("patients", 1))
        counts.setdefault(
            "invoices", ds.get("patients", 1) * ds.get("invoices_per_patient", 1)
        )
        return counts

    def currencies(self) -> list[str]:
        listed = (self.manifest.get("parameters") or {}).get(
            "currencies"
        ) or self.preset.dataset.get("currencies")
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
        db_url = self.external_db or sqlite_url(self.base_db)
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
            db_url = self.external_db or sqlite_url(self.base_db)
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
