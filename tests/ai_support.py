"""Helpers of the diagnosis tests: a small clinic whose images have known
sizes and owners, the AI stub as a real process, and a measure of the
memory a call leaves behind."""

from __future__ import annotations

import datetime as dt
import gc
import json
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from benchmarks.serverproc import ServerProcess, free_port, membench_command
from reference_impl import imagegen
from reference_impl.models import Base, Patient, RadiologyImage

DATABASE_NAME = "clinic.sqlite"
IMAGES_DIR = "images"
START = dt.datetime(2024, 1, 1, 9, 0)

#: (kind, scale) of the files a functional clinic's rows cycle through: a
#: panoramic and a bitewing wider than 1024 px, and a periapical that fits.
FUNCTIONAL_FILES = (("panoramic", 1.0), ("bitewing", 0.7), ("periapical", 0.5))


def write_files(
    folder: Path, images: Sequence[imagegen.GeneratedImage]
) -> list[tuple[str, imagegen.GeneratedImage]]:
    folder.mkdir(parents=True, exist_ok=True)
    named = []
    for n, image in enumerate(images):
        name = f"{image.kind}-{n:02d}{image.extension}"
        (folder / name).write_bytes(image.data)
        named.append((name, image))
    return named


def build_clinic(
    out: Path,
    images_per_patient: Sequence[int],
    files: Sequence[imagegen.GeneratedImage],
) -> Path:
    """A dataset folder whose patient ``n + 1`` has ``images_per_patient[n]``
    image rows, cycling through ``files``; later ids were taken later."""
    named = write_files(out / IMAGES_DIR, files)
    engine = create_engine(f"sqlite:///{out / DATABASE_NAME}")
    Base.metadata.create_all(engine)
    image_id = 0
    with Session(engine) as session:
        for n, count in enumerate(images_per_patient):
            pid = n + 1
            session.add(_patient(pid))
            for _ in range(count):
                image_id += 1
                name, image = named[image_id % len(named)]
                session.add(_image_row(image_id, pid, name, image))
        session.commit()
    engine.dispose()
    manifest = {
        "database": DATABASE_NAME,
        "images": IMAGES_DIR,
        "counts": {"patients": len(images_per_patient), "images": image_id},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _patient(pid: int) -> Patient:
    return Patient(
        id=pid,
        first_name="Test",
        last_name=f"Patient{pid}",
        birth_date=dt.date(1980, 1, 1),
        phone="+1 555 0100",
        email=f"patient{pid}@example.test",
        address="1 Test Street",
        notes="",
        created_at=START,
    )


def _image_row(
    image_id: int, pid: int, name: str, image: imagegen.GeneratedImage
) -> RadiologyImage:
    taken = START + dt.timedelta(days=image_id)
    return RadiologyImage(
        id=image_id,
        patient_id=pid,
        kind=image.kind,
        file_name=name,
        original_name=name,
        mime_type=image.mime_type,
        size_bytes=image.size_bytes,
        width_px=image.width_px,
        height_px=image.height_px,
        taken_at=taken,
        description="",
        analysis=None,
        created_at=taken,
    )


def functional_clinic(out: Path) -> Path:
    """Patient 1 has 12 images, patient 2 has 2, patient 3 has none."""
    rng = random.Random(7)
    files = [imagegen.generate(kind, rng, scale) for kind, scale in FUNCTIONAL_FILES]
    return build_clinic(out, [12, 2, 0], files)


def file_sizes(dataset: Path) -> dict[int, int]:
    """Image id -> size in bytes of its file."""
    engine = create_engine(f"sqlite:///{dataset / DATABASE_NAME}")
    with Session(engine) as session:
        rows = session.query(RadiologyImage.id, RadiologyImage.file_name).all()
        sizes = {
            row.id: (dataset / IMAGES_DIR / row.file_name).stat().st_size
            for row in rows
        }
    engine.dispose()
    return sizes


# -- the AI stub ---------------------------------------------------------------


@contextmanager
def running_stub(log_dir: Path, *args: str) -> Iterator[str]:
    """``membench ai-stub`` on a free port; yields its base URL (with /v1)."""
    port = free_port()
    command = membench_command("ai-stub", "--port", str(port), *args)
    with ServerProcess(command, port=port, log_path=log_dir / f"stub-{port}.log"):
        yield f"http://127.0.0.1:{port}/v1"


def stub_root(ai_url: str) -> str:
    return ai_url.removesuffix("/v1")


def stub_control(ai_url: str, **changes: Any) -> dict[str, Any]:
    """POST /control with ``changes`` (none: GET); the stub's state."""
    url = stub_root(ai_url) + "/control"
    if changes:
        response = httpx.post(url, json=changes, timeout=10)
    else:
        response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.json()


def wait_until_idle(ai_url: str, polls: int = 100) -> dict[str, Any]:
    """The stub's state once nothing is in flight (polled at most ``polls`` times
    50 ms apart: a client that gave up has closed its connection by then)."""
    for _ in range(polls):
        state = stub_control(ai_url)
        if state["inFlight"] == 0:
            break
        time.sleep(0.05)
    return state


# -- memory a call leaves behind ---------------------------------------------------


def bytes_left_behind(call: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``call`` with the cycle collector off; (its result, bytes it left
    allocated as tracemalloc counts them). Whatever survives only in a
    reference cycle is counted, because nothing collects it."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        if was_enabled:
            gc.enable()
        gc.collect()
    return result, after - before
