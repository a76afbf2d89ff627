"""``membench dataset build``: the synthetic clinic, its manifest, its bytes."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from reference_impl import cli, datagen
from reference_impl.errors import UsageError
from reference_impl.presets import PRESET_NAMES, load_preset
from reference_impl.security import verify_password

TABLES = {
    "patients": "patients",
    "images": "radiology_images",
    "invoices": "invoices",
    "invoice_items": "invoice_items",
    "exchange_rates": "exchange_rates",
    "users": "users",
}
TINY = {
    "patients": 6,
    "images_per_patient": 3,
    "distinct_images": 5,
    "image_scale": 0.05,
    "analysis_kib": 6,
    "invoices_per_patient": 1,
    "items_per_invoice": 2,
    "currencies": ["EUR", "IRR"],
    "rate_days": 3,
    "users": 1,
}


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def query(folder: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{folder / 'clinic.sqlite'}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``ci`` dataset of this module's own: servers started by other tests
    open the shared one, and SQLite records their journal mode in its header."""
    out = tmp_path_factory.mktemp("dataset") / "ci"
    datagen.build("ci", out=out)
    return out


def tiny_params(**changes: object) -> datagen.DatasetParams:
    return datagen.DatasetParams.from_table({**TINY, **changes})


def test_the_same_seed_gives_byte_identical_files(built, tmp_path):
    again = tmp_path / "again"
    datagen.build("ci", out=again, seed=datagen.DEFAULT_SEED)
    first, second = files_of(built), files_of(again)
    assert sorted(first) == sorted(second)
    assert "clinic.sqlite" in first and "manifest.json" in first
    for name in first:
        assert first[name] == second[name], name


def test_another_seed_gives_other_rows_and_images(tmp_path):
    one = datagen.build_dataset(tiny_params(), tmp_path / "one", seed=1)
    two = datagen.build_dataset(tiny_params(), tmp_path / "two", seed=2)
    assert one["counts"] == two["counts"]
    assert one["login"] != two["login"]
    a, b = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert sorted(a) == sorted(b)
    assert all(a[name] != b[name] for name in a)


def test_the_manifest_counts_what_the_database_holds(built):
    manifest = manifest_of(built)
    preset = load_preset("ci").dataset
    for key, table in TABLES.items():
        assert (
            query(built, f"SELECT count(*) FROM {table}")[0][0]
            == (manifest["counts"][key])
        ), table
    assert manifest["counts"]["patients"] == preset["patients"]
    assert manifest["counts"]["images"] == (
        preset["patients"] * preset["images_per_patient"]
    )
    assert manifest["counts"]["distinct_image_files"] == preset["distinct_images"]
    used = query(built, "SELECT DISTINCT file_name FROM radiology_images")
    files = sorted(p.name for p in (built / manifest["images"]).iterdir())
    assert sorted(name for (name,) in used) == files
    assert len(files) == preset["distinct_images"]


def test_the_manifest_names_its_files_and_their_sizes(built):
    manifest = manifest_of(built)
    assert manifest["preset"] == "ci"
    assert manifest["seed"] == datagen.DEFAULT_SEED
    assert manifest["database"] == "clinic.sqlite"
    assert manifest["images"] == "images"
    assert "db_url" not in manifest
    sizes = manifest["bytes"]
    assert sizes["database"] == (built / "clinic.sqlite").stat().st_size
    images = built / "images"
    assert sizes["images"] == sum(p.stat().st_size for p in images.iterdir())
    (rows_bytes,) = query(built, "SELECT sum(size_bytes) FROM radiology_images")
    assert sizes["image_rows"] == rows_bytes[0]
    kinds = manifest["image_kinds"]
    assert set(kinds) == set(datagen.KIND_WEIGHTS)
    assert sum(k["files"] for k in kinds.values()) == len(list(images.iterdir()))
    assert sum(k["rows"] for k in kinds.values()) == manifest["counts"]["images"]
    for stats in kinds.values():
        assert stats["bytes_min"] <= stats["bytes_mean"] <= stats["bytes_max"]


def test_every_image_row_points_to_a_real_file_that_matches_it(built):
    manifest = manifest_of(built)
    rows = query(
        built,
        "SELECT kind, file_name, mime_type, size_bytes, width_px, height_px"
        " FROM radiology_images",
    )
    for kind, file_name, mime, size, width, height in rows:
        path = built / manifest["images"] / file_name
        assert path.stat().st_size == size
        with Image.open(path) as image:
            image.load()
            assert image.size == (width, height)
            assert Image.MIME[image.format] == mime
        stats = manifest["image_kinds"][kind]
        assert (stats["width_px"], stats["height_px"]) == (width, height)


def test_analysis_documents_have_the_preset_size_and_shape(built):
    target = load_preset("ci").dataset["analysis_kib"] * 1024
    rows = query(built, "SELECT kind, analysis FROM radiology_images")
    kinds_seen = set()
    for kind, text in rows:
        doc = json.loads(text)
        assert abs(len(text) - target) <= 0.05 * target
        assert [t["tooth"] for t in doc["teeth"]] == list(datagen.TEETH)
        assert doc["imageKind"] == kind
        assert doc["findings"], "padding is made of findings"
        if kind == "cephalometric":
            assert {"S", "N", "A", "B"} <= {p["code"] for p in doc["landmarks"]}
        kinds_seen.add(kind)
    assert kinds_seen == set(datagen.KIND_WEIGHTS)
    manifest = manifest_of(built)
    assert manifest["bytes"]["analysis"] == sum(len(text) for _, text in rows)


@pytest.mark.parametrize("kib", [6, 24, 35])
def test_an_analysis_document_lands_near_its_target(kib):
    rng = datagen.random.Random(kib)
    doc = datagen.analysis_document(
        rng, "cephalometric", 2700, 2200, datagen.EPOCH, kib * 1024
    )
    size = len(json.dumps(doc, separators=(",", ":")))
    assert kib * 1024 - 64 <= size <= kib * 1024


def test_passwords_are_stored_as_scrypt_hashes_that_verify(built):
    manifest = manifest_of(built)
    login = manifest["login"]
    users = query(built, "SELECT email, password_hash FROM users")
    assert len(users) == manifest["counts"]["users"]
    assert all(stored.startswith("scrypt$") for _, stored in users)
    assert len({stored.split("$")[4] for _, stored in users}) == len(users)
    stored = dict(users)[login["email"]]
    assert verify_password(login["password"], stored)
    assert not verify_password(login["password"] + "x", stored)
    raw = (built / "clinic.sqlite").read_bytes()
    assert login["password"].encode() not in raw


def test_emails_are_lowercase_and_unique(built):
    for table in ("users", "patients"):
        emails = [e for (e,) in query(built, f"SELECT email FROM {table}")]
        assert emails == [e.lower() for e in emails]
        assert len(set(emails)) == len(emails)


def test_rebuilding_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "data"
    datagen.build_dataset(tiny_params(), out, seed=3)
    before = files_of(out)
    (out / "images" / "uploaded-by-a-test.jpg").write_bytes(b"not part of it")
    datagen.build_dataset(tiny_params(), out, seed=3)
    assert files_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="refusing to replace"):
        datagen.build_dataset(tiny_params(), tmp_path, seed=1)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_build_works_from_inside_an_event_loop(tmp_path):
    async def build_in_loop() -> dict:
        return datagen.build_dataset(tiny_params(), tmp_path / "d", seed=4)

    manifest = asyncio.run(build_in_loop())
    assert manifest["counts"]["patients"] == TINY["patients"]


def test_no_analysis_when_the_preset_asks_for_none(tmp_path):
    manifest = datagen.build_dataset(tiny_params(analysis_kib=0), tmp_path / "d")
    assert manifest["bytes"]["analysis"] == 0
    rows = query(tmp_path / "d", "SELECT analysis FROM radiology_images")
    assert {value for (value,) in rows} == {None}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_has_a_usable_dataset_table(name):
    params = datagen.DatasetParams.from_table(load_preset(name).dataset)
    assert params.patients > 0
    assert params.distinct_images >= len(datagen.KIND_WEIGHTS)


def test_a_bad_dataset_table_names_the_key_and_the_rule():
    with pytest.raises(UsageError, match="lacks the key 'users'"):
        datagen.DatasetParams.from_table(
            {k: v for k, v in TINY.items() if k != "users"}
        )
    with pytest.raises(UsageError, match=r"patients=-1 must be a non-negative int"):
        datagen.DatasetParams.from_table({**TINY, "patients": -1})
    with pytest.raises(UsageError, match=r"image_scale=0\.0 must be in"):
        datagen.DatasetParams.from_table({**TINY, "image_scale": 0})
    with pytest.raises(UsageError, match="3-letter codes"):
        datagen.DatasetParams.from_table({**TINY, "currencies": ["EURO"]})


def test_the_pool_has_every_kind_and_follows_the_weights():
    plan = datagen.plan_pool(40)
    assert len(plan) == 40
    counts = {
        kind: sum(1 for k, _ in plan if k == kind) for kind in datagen.KIND_WEIGHTS
    }
    assert all(n >= 1 for n in counts.values())
    assert counts["bitewing"] > counts["cephalometric"]
    assert [k for k, _ in datagen.plan_pool(2)] == ["bitewing", "periapical"]
    assert datagen.plan_pool(0) == []


def test_the_cli_builds_and_prints_time_and_sizes(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["dataset", "build", "--preset", "ci", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "built preset 'ci' (seed 1)" in printed
    assert " s\n" in printed and "MiB" in printed
    assert (
        manifest_of(out)["counts"]["patients"] == load_preset("ci").dataset["patients"]
    )


def test_an_unknown_preset_exits_2_with_a_clear_message(tmp_path, capsys):
    code = cli.main(
        ["dataset", "build", "--preset", "huge", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown preset 'huge'" in err
    assert "ci, default, production" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nonsense", "--db 'nonsense' is not an SQLAlchemy URL"),
        ("postgresql://u:secret@127.0.0.1/x", "names the synchronous driver"),
    ],
)
def test_an_unusable_db_url_exits_2_before_any_work(tmp_path, capsys, url, message):
    out = tmp_path / "x"
    code = cli.main(["dataset", "build", "--out", str(out), "--db", url])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "secret" not in err
    assert not out.exists()


def test_dataset_needs_an_action(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["dataset"])
    assert stop.value.code == 2


async def _admin(url: str, statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _insert_patient(url: str) -> int:
    """The id PostgreSQL gives a patient inserted without one (rolled back)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            new_id = await conn.scalar(
                text(
                    "INSERT INTO patients (first_name, last_name, birth_date, phone,"
                    " email, address, notes, created_at) VALUES ('A', 'B',"
                    " '2000-01-01', '1', 'a@example.com', 'x', '', now()) RETURNING id"
                )
            )
            await conn.rollback()
            return new_id
    finally:
        await engine.dispose()


@pytest.mark.postgres
def test_postgres_ids_continue_after_the_loaded_rows(tmp_path):
    from sqlalchemy.engine import make_url

    url = os.environ.get("MEMBENCH_PG_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must set MEMBENCH_PG_URL for the PostgreSQL tests")
        pytest.skip("MEMBENCH_PG_URL is not set; start one with .ci/postgres.sh")
    name = f"membench_dataset_{os.getpid()}"
    private = make_url(url).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_admin(url, f"CREATE DATABASE {name}"))
    try:
        manifest = datagen.build_dataset(tiny_params(), tmp_path / "pg", db_url=private)
        assert manifest["database"] is None
        assert manifest["db_url"] == private
        assert asyncio.run(_insert_patient(private)) == TINY["patients"] + 1
    finally:
        asyncio.run(_admin(url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
