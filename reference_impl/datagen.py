"""Build a synthetic clinic: ``membench dataset build --preset NAME``.

A dataset folder holds the SQLite database (``clinic.sqlite``), the image
files its rows point to (``images/``) and ``manifest.json`` (counts, bytes,
seed, preset, per-kind image statistics, and one login). With ``--db URL``
the rows go into that database instead (its tables are dropped and made
anew) and the images and manifest still go under ``--out``.

Rows share a pool of distinct image files (the preset's ``distinct_images``):
listing never reads the files, and the routes that do read them only need
real files of realistic weight, so a production-sized clinic fits in a few
hundred MB. Each image row carries an ``analysis`` JSON document (findings
per tooth, landmarks, measurements) of about the preset's ``analysis_kib``
KiB, measured as the compact JSON the API sends.

The same seed gives the same bytes: every value comes from
``random.Random`` streams derived from the seed, timestamps count back from a
fixed moment, and the SQLite file is vacuumed. The build time is printed,
never stored.

Every person, email and password in a dataset is synthetic; the ``login`` in
the manifest is a demo credential of one synthetic user, for load generators
and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import json
import logging
import os
import random
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from reference_impl import imagegen
from reference_impl.errors import UsageError
from reference_impl.presets import PRESET_NAMES, default_dataset_dir, load_preset
from reference_impl.server import sqlite_url

log = logging.getLogger("reference_impl")

DEFAULT_SEED = 1
DATABASE_NAME = "clinic.sqlite"
IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

#: Every timestamp of a dataset lies before this moment.
EPOCH = dt.datetime(2025, 1, 1, 9, 0, 0)
#: Patients joined the clinic within this many days before ``EPOCH``.
HISTORY_DAYS = 3 * 365
#: Rows inserted per statement.
BATCH_ROWS = 200
#: Patients generated (with their images and invoices) before an insert, so
#: a large clinic never sits in memory whole.
BATCH_PATIENTS = 25
BASE_CURRENCY = "USD"

#: How often a clinic takes each kind, and so how the pool is split.
KIND_WEIGHTS = {
    "bitewing": 0.28,
    "periapical": 0.28,
    "panoramic": 0.2,
    "intraoral-photo": 0.16,
    "cephalometric": 0.08,
}

REQUIRED_KEYS = {
    "patients": int,
    "images_per_patient": int,
    "distinct_images": int,
    "image_scale": float,
    "analysis_kib": float,
    "invoices_per_patient": int,
    "items_per_invoice": int,
    "currencies": list,
    "rate_days": int,
    "users": int,
}


# -- parameters ------------------------------------------------------------


@dataclass(frozen=True)
class DatasetParams:
    """What one preset's ``[NAME.dataset]`` table asks for."""

    patients: int
    images_per_patient: int
    distinct_images: int
    image_scale: float
    analysis_kib: float
    invoices_per_patient: int
    items_per_invoice: int
    currencies: tuple[str, ...]
    rate_days: int
    users: int

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str = "dataset") -> DatasetParams:
        values: dict[str, Any] = {}
        for key, kind in REQUIRED_KEYS.items():
            if key not in table:
                raise UsageError(f"{where} lacks the key {key!r}")
            value = table[key]
            numeric = kind in (int, float) and not isinstance(value, bool)
            if kind is float and numeric and isinstance(value, int | float):
                value = float(value)
            if not isinstance(value, kind) or (numeric and value < 0):
                raise UsageError(
                    f"{where}: {key}={value!r} must be a non-negative {kind.__name__}"
                )
            values[key] = value
        currencies = tuple(str(c).upper() for c in values.pop("currencies"))
        bad = [c for c in currencies if len(c) != 3 or not c.isalpha()]
        if bad or not currencies:
            raise UsageError(
                f"{where}: currencies={list(currencies)!r} must be 3-letter codes"
                " (at least one)"
            )
        params = cls(currencies=currencies, **values)
        if params.image_scale <= 0 or params.image_scale > 4:
            raise UsageError(
                f"{where}: image_scale={params.image_scale} must be in (0, 4]"
            )
        if params.images_per_patient and params.distinct_images < 1:
            raise UsageError(
                f"{where}: distinct_images={params.distinct_images} must be at least"
                " 1 when images_per_patient > 0"
            )
        if params.items_per_invoice > len(PROCEDURES):
            raise UsageError(
                f"{where}: items_per_invoice={params.items_per_invoice} exceeds the"
                f" {len(PROCEDURES)} procedures the generator knows"
            )
        if params.users < 1:
            raise UsageError(f"{where}: users={params.users} must be at least 1")
        return params

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["currencies"] = list(self.currencies)
        return out


# -- vocabulary --------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FIRST_NAMES = _words(
    "Sara Reza Maryam Ali Zahra Mohammad Fatemeh Hossein Niloufar Amir Leila "
    "Arash Shirin Kian Parisa Babak Yasmin Dariush Mina Omid Elena Lucas Sofia "
    "Noah Emma Liam Hannah Jonas Aylin Emre Layla Karim Anna David Maya Samuel "
    "Nora Tomas Ines Farid"
)
LAST_NAMES = _words(
    "Ahmadi Hosseini Karimi Rezaei Moradi Mohammadi Jafari Rahimi Kazemi "
    "Sadeghi Hashemi Ebrahimi Tehrani Shirazi Najafi Farahani Bagheri Amini "
    "Yilmaz Kaya Haddad Nasser Schmidt Fischer Rossi Bianchi Martin Dubois "
    "Novak Horvat Smith Taylor Garcia Lopez Silva Costa"
)
STREETS = (
    "Valiasr St",
    "Enghelab St",
    "Shariati St",
    "Mirdamad Blvd",
    "Pasdaran Ave",
    "Keshavarz Blvd",
    "Motahari St",
    "Azadi St",
    "Jordan St",
    "Niavaran St",
    "Saadat Abad Ave",
    "Gandhi St",
    "Zafar St",
    "Fatemi Sq",
    "Vanak Sq",
)
CITIES = ("Tehran", "Karaj", "Isfahan", "Shiraz", "Tabriz", "Mashhad", "Qom")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example")
PATIENT_NOTES = (
    "Allergic to penicillin; use clindamycin when antibiotics are needed.",
    "Reports night-time bruxism; occlusal guard recommended.",
    "Anxious patient; prefers morning appointments and short sessions.",
    "Type 2 diabetes, controlled; check HbA1c before surgery.",
    "Takes low-dose aspirin daily; consult physician before extractions.",
    "Orthodontic treatment completed; wears a removable retainer at night.",
    "Smoker, about ten cigarettes a day; cessation advice given.",
    "Sensitive to cold on the lower left; desensitising paste advised.",
    "Pregnant, second trimester; radiographs only when essential.",
    "Hypertension on amlodipine; measure blood pressure before treatment.",
    "Latex allergy; use nitrile gloves and a latex-free dam.",
    "Referred by an orthodontist for a cephalometric assessment.",
    "Prefers invoices in euros; pays by bank transfer.",
    "Gag reflex; use a size 1 sensor for posterior periapicals.",
    "Had a full-mouth scaling last year; recall every six months.",
)
IMAGE_PURPOSES = (
    "routine check-up",
    "caries screening",
    "pain on biting",
    "post-treatment control",
    "implant planning",
    "orthodontic assessment",
    "periodontal evaluation",
    "emergency visit",
    "second opinion",
)
PROCEDURES = (  # (description, price in the base currency, most per invoice)
    ("Comprehensive oral examination", Decimal("45.00"), 1),
    ("Periodic oral evaluation", Decimal("30.00"), 1),
    ("Panoramic radiograph", Decimal("65.00"), 1),
    ("Bitewing radiographs, two films", Decimal("35.00"), 1),
    ("Periapical radiograph", Decimal("18.00"), 3),
    ("Cephalometric radiograph", Decimal("70.00"), 1),
    ("Intraoral photographs", Decimal("25.00"), 1),
    ("Prophylaxis and polishing", Decimal("60.00"), 1),
    ("Scaling and root planing, per quadrant", Decimal("110.00"), 4),
    ("Composite filling, one surface", Decimal("85.00"), 3),
    ("Composite filling, two surfaces", Decimal("120.00"), 3),
    ("Amalgam filling, two surfaces", Decimal("90.00"), 2),
    ("Root canal treatment, molar", Decimal("640.00"), 1),
    ("Root canal treatment, anterior", Decimal("420.00"), 1),
    ("Porcelain-fused-to-metal crown", Decimal("780.00"), 1),
    ("Zirconia crown", Decimal("880.00"), 1),
    ("Simple extraction", Decimal("95.00"), 2),
    ("Surgical extraction of a wisdom tooth", Decimal("260.00"), 2),
    ("Fluoride varnish", Decimal("28.00"), 1),
    ("Fissure sealant, per tooth", Decimal("32.00"), 4),
    ("Night guard", Decimal("310.00"), 1),
    ("Tooth whitening, in office", Decimal("350.00"), 1),
)
INVOICE_STATUSES = (("paid", 0.68), ("pending", 0.18), ("overdue", 0.1), ("void", 0.04))
#: Units of each currency for one unit of ``BASE_CURRENCY`` at the start of
#: the rate history, and the daily volatility of its random walk.
RATE_START = {
    "USD": (Decimal(1), 0.0),
    "EUR": (Decimal("0.92"), 0.004),
    "GBP": (Decimal("0.79"), 0.004),
    "AED": (Decimal("3.6725"), 0.0002),
    "TRY": (Decimal("32.5"), 0.006),
    "IRR": (Decimal("585000"), 0.012),
}
USER_ROLES = ("dentist", "admin", "assistant", "radiologist", "receptionist")
PASSWORD_WORDS = _words(
    "molar enamel canine crown bridge pulp dentin floss incisor apex implant "
    "veneer gum smile mirror probe"
)

TEETH = tuple(q * 10 + n for q in (1, 2, 3, 4) for n in range(1, 9))
SURFACES = ("M", "O", "D", "B", "L")
CONDITIONS = (
    ("healthy", 0.58),
    ("caries", 0.1),
    ("restoration", 0.12),
    ("crown", 0.04),
    ("root_canal_treated", 0.04),
    ("missing", 0.05),
    ("calculus", 0.04),
    ("periapical_lesion", 0.015),
    ("impacted", 0.01),
    ("fracture", 0.005),
)
FINDING_TYPES = (
    "caries",
    "secondary_caries",
    "periapical_lesion",
    "bone_loss",
    "calculus",
    "open_contact",
    "overhang",
    "widened_pdl",
    "root_resorption",
    "impaction",
    "fracture",
    "restoration_defect",
)
SEVERITIES = ("minimal", "mild", "moderate", "severe")
FINDING_TEXT = {
    "caries": "Radiolucency on the {surface} surface reaching the {depth}",
    "secondary_caries": "Radiolucency under the existing restoration at the"
    " {surface} margin",
    "periapical_lesion": "Periapical radiolucency of about {size} mm at the apex",
    "bone_loss": "Horizontal bone loss of {size} mm from the cemento-enamel junction",
    "calculus": "Radiopaque deposit on the {surface} surface below the contact",
    "open_contact": "Open contact on the {surface} side, food impaction likely",
    "overhang": "Restoration overhang of {size} mm on the {surface} margin",
    "widened_pdl": "Widened periodontal ligament space along the {surface} root",
    "root_resorption": "External root resorption of {size} mm at the apical third",
    "impaction": "Partially impacted, {angle} angulation, close to the canal",
    "fracture": "Radiolucent line through the {surface} cusp, suspected crack",
    "restoration_defect": "Marginal gap of {size} mm at the {surface} restoration",
}
DEPTHS = ("outer enamel", "inner enamel", "outer dentin", "middle dentin", "pulp")
ANGLES = ("mesioangular", "distoangular", "vertical", "horizontal")
RECOMMENDATIONS = (
    "Monitor at the next recall visit",
    "Composite restoration advised",
    "Endodontic evaluation advised",
    "Periodontal charting and scaling advised",
    "Replace the defective restoration",
    "Extraction to be discussed with the patient",
    "Take a periapical radiograph to confirm",
    "Refer to the oral surgeon",
    "Apply fluoride varnish and review oral hygiene",
)
CEPH_LANDMARKS = tuple(
    tuple(entry.split("="))
    for entry in (
        "S=Sella",
        "N=Nasion",
        "Or=Orbitale",
        "Po=Porion",
        "A=Subspinale",
        "B=Supramentale",
        "Pog=Pogonion",
        "Me=Menton",
        "Gn=Gnathion",
        "Go=Gonion",
        "LIT=Lower incisal incision",
        "UIT=Upper incisal incision",
        "UL=Upper lip",
        "LL=Lower lip",
        "Sn=Subnasale",
        "PogS=Soft tissue pogonion",
        "PNS=Posterior nasal spine",
        "ANS=Anterior nasal spine",
        "Ar=Articulare",
    )
)
PANORAMIC_LANDMARKS = tuple(
    tuple(entry.split("="))
    for entry in (
        "CoR=Right condyle",
        "CoL=Left condyle",
        "CrR=Right coronoid",
        "CrL=Left coronoid",
        "GoR=Right gonion",
        "GoL=Left gonion",
        "MfR=Right mental foramen",
        "MfL=Left mental foramen",
        "ANS=Anterior nasal spine",
        "Me=Menton",
    )
)
CEPH_MEASUREMENTS = (  # (name, unit, norm mean, norm sd)
    ("SNA", "deg", 82.0, 3.0),
    ("SNB", "deg", 80.0, 3.0),
    ("ANB", "deg", 2.0, 2.0),
    ("FMA", "deg", 25.0, 4.0),
    ("IMPA", "deg", 90.0, 5.0),
    ("U1-SN", "deg", 103.0, 6.0),
    ("Interincisal angle", "deg", 131.0, 6.0),
    ("Wits appraisal", "mm", 0.0, 2.0),
    ("Lower face height ratio", "%", 55.0, 2.0),
)
KIND_NAMES = {
    "panoramic": ("PAN", "Panoramic radiograph"),
    "bitewing": ("BW", "Bitewing radiograph"),
    "periapical": ("PA", "Periapical radiograph"),
    "cephalometric": ("CEPH_LAT", "Lateral cephalogram"),
    "intraoral-photo": ("IMG", "Intraoral photograph"),
}


def _weighted(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    names, weights = zip(*table, strict=True)
    return rng.choices(names, weights)[0]


def _instant(
    rng: random.Random, days_back_min: float, days_back_max: float
) -> dt.datetime:
    """A moment in clinic hours between the two distances before ``EPOCH``."""
    day = EPOCH.date() - dt.timedelta(days=rng.uniform(days_back_min, days_back_max))
    seconds = rng.randrange(8 * 3600, 19 * 3600)
    return dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=seconds)


def _money(value: Decimal, currency: str) -> Decimal:
    step = Decimal(1000) if currency == "IRR" else Decimal("0.01")
    return (value / step).quantize(Decimal(1), ROUND_HALF_UP) * step


# -- the image pool ----------------------------------------------------------


@dataclass(frozen=True)
class PoolFile:
    """One distinct image file that rows point to."""

    kind: str
    file_name: str
    mime_type: str
    size_bytes: int
    width_px: int
    height_px: int


def plan_pool(distinct: int) -> list[tuple[str, int]]:
    """(kind, number) of each pool file: every kind at least once, then by weight.

    With fewer files than kinds, the most common kinds come first.
    """
    kinds = sorted(KIND_WEIGHTS, key=lambda k: -KIND_WEIGHTS[k])[: max(distinct, 0)]
    if not kinds:
        return []
    total = sum(KIND_WEIGHTS[k] for k in kinds)
    spare = distinct - len(kinds)
    shares = {k: spare * KIND_WEIGHTS[k] / total for k in kinds}
    counts = {k: 1 + int(shares[k]) for k in kinds}
    left = distinct - sum(counts.values())
    by_remainder = sorted(kinds, key=lambda k: (-(shares[k] % 1), kinds.index(k)))
    for k in by_remainder[:left]:
        counts[k] += 1
    return [(k, n) for k in kinds for n in range(1, counts[k] + 1)]


def _make_pool_file(
    seed: int, kind: str, number: int, scale: float, folder: Path
) -> PoolFile:
    rng = random.Random(f"{seed}/pool/{kind}/{number}")
    image = imagegen.generate(kind, rng, scale)
    name = f"{kind}-{number:04d}{image.extension}"
    (folder / name).write_bytes(image.data)
    return PoolFile(
        kind, name, image.mime_type, image.size_bytes, image.width_px, image.height_px
    )


def write_pool(
    seed: int, distinct: int, scale: float, folder: Path, workers: int = 2
) -> list[PoolFile]:
    """Draw the pool's files into ``folder``; each file has its own stream."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_pool(distinct)
    # Pillow releases the GIL while it blurs and encodes, so two threads keep
    # two cores busy; every file has its own generator, so order is moot.
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(_make_pool_file, seed, kind, n, scale, folder)
            for kind, n in plan
        ]
        return [f.result() for f in futures]


# -- analysis documents -------------------------------------------------------


#: JSON as the API sends it (no spaces); one encoder, made once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _compact(obj: Any) -> str:
    return _COMPACT.encode(obj)


def _tooth_entry(rng: random.Random, tooth: int) -> dict[str, Any]:
    condition = _weighted(rng, CONDITIONS)
    entry: dict[str, Any] = {"tooth": tooth, "condition": condition}
    if condition in ("healthy", "missing"):
        entry["surfaces"] = []
        entry["confidence"] = round(rng.uniform(0.9, 0.995), 3)
        return entry
    entry["surfaces"] = sorted(
        rng.sample(SURFACES, rng.randint(1, 3)), key=SURFACES.index
    )
    entry["confidence"] = round(rng.uniform(0.55, 0.97), 3)
    entry["boneLevelMm"] = round(rng.uniform(0.5, 5.5), 1)
    entry["notes"] = f"{condition.replace('_', ' ').capitalize()} on {tooth}; " + (
        rng.choice(RECOMMENDATIONS).lower()
    )
    return entry


def _finding(
    rng: random.Random, number: int, width: int, height: int
) -> dict[str, Any]:
    kind = rng.choice(FINDING_TYPES)
    text = FINDING_TEXT[kind].format(
        surface=rng.choice(("mesial", "distal", "occlusal", "buccal", "lingual")),
        depth=rng.choice(DEPTHS),
        size=round(rng.uniform(0.4, 6.0), 1),
        angle=rng.choice(ANGLES),
    )
    x, y = rng.randrange(width), rng.randrange(height)
    return {
        "id": f"F{number:04d}",
        "tooth": rng.choice(TEETH),
        "type": kind,
        "severity": rng.choice(SEVERITIES),
        "confidence": round(rng.uniform(0.35, 0.99), 3),
        "region": {
            "x": x,
            "y": y,
            "width": rng.randint(8, max(9, width // 12)),
            "height": rng.randint(8, max(9, height // 8)),
        },
        "description": f"{text}. {rng.choice(RECOMMENDATIONS)}.",
        "differential": rng.sample(FINDING_TYPES, 2),
    }


def _landmarks(rng: random.Random, kind: str, width: int, height: int) -> list[dict]:
    table = {"cephalometric": CEPH_LANDMARKS, "panoramic": PANORAMIC_LANDMARKS}
    return [
        {
            "code": code,
            "name": name,
            "x": rng.randrange(width),
            "y": rng.randrange(height),
            "confidence": round(rng.uniform(0.7, 0.99), 3),
        }
        for code, name in table.get(kind, ())
    ]


def _measurements(rng: random.Random, kind: str) -> list[dict]:
    if kind == "cephalometric":
        out = []
        for name, unit, mean, sd in CEPH_MEASUREMENTS:
            value = round(rng.gauss(mean, sd * 1.3), 1)
            z = (value - mean) / sd
            out.append(
                {
                    "name": name,
                    "value": value,
                    "unit": unit,
                    "norm": [mean, sd],
                    "interpretation": "increased"
                    if z > 1
                    else "decreased"
                    if z < -1
                    else "within norm",
                }
            )
        return out
    if kind == "intraoral-photo":
        return [
            {"name": "Shade", "value": rng.choice(("A1", "A2", "A3", "B1", "B2"))},
            {"name": "Plaque index", "value": round(rng.uniform(0, 3), 1)},
        ]
    sites = rng.sample(TEETH, 4)
    return [
        {
            "name": f"Bone level {tooth} {side}",
            "value": round(rng.uniform(0.8, 6.0), 1),
            "unit": "mm",
        }
        for tooth in sites
        for side in ("mesial", "distal")
    ]


def analysis_document(
    rng: random.Random,
    kind: str,
    width: int,
    height: int,
    analyzed_at: dt.datetime,
    target_bytes: int,
) -> dict[str, Any]:
    """What the vision model said about one image, about ``target_bytes`` long.

    The base (an entry per tooth, landmarks, measurements) is 3-6 KiB; more
    findings are added until the compact JSON reaches ``target_bytes``, the
    last one's description cut at a word to land a few bytes short of it. A
    target below the base gives the base alone.
    """
    doc: dict[str, Any] = {
        "model": {"name": "dentalvision", "version": "2.4.1"},
        "analyzedAt": analyzed_at.isoformat(),
        "imageKind": kind,
        "imageSize": {"width": width, "height": height},
        "quality": {
            "score": round(rng.uniform(0.6, 0.99), 3),
            "exposure": rng.choice(("adequate", "adequate", "under", "over")),
            "positioning": rng.choice(("good", "good", "acceptable", "tilted")),
        },
        "summary": "",
        "teeth": [_tooth_entry(rng, tooth) for tooth in TEETH],
        "landmarks": _landmarks(rng, kind, width, height),
        "measurements": _measurements(rng, kind),
        "findings": [],
    }
    flagged = [t["tooth"] for t in doc["teeth"] if t["condition"] != "healthy"]
    doc["summary"] = (
        f"{len(flagged)} teeth need attention"
        + (f" ({', '.join(map(str, flagged[:8]))})" if flagged else "")
        + f". {rng.choice(RECOMMENDATIONS)}."
    )
    size = len(_compact(doc))
    findings = doc["findings"]
    misses = 0
    while misses < 5:
        item = _finding(rng, len(findings) + 1, width, height)
        cost = len(_compact(item)) + (1 if findings else 0)
        if size + cost <= target_bytes:
            findings.append(item)
            size += cost
            continue
        # The last finding's description is cut at a word to fit, when a few
        # words of it remain; else another finding is tried.
        keep = len(item["description"]) - (size + cost - target_bytes) - 1
        cut = item["description"][: max(keep, 0)].rsplit(" ", 1)[0].rstrip(",;.")
        if len(cut) >= 20:
            item["description"] = cut + "."
            findings.append(item)
            size += len(_compact(item)) + (1 if len(findings) > 1 else 0)
            break
        misses += 1
    # What no finding fits into goes to the summary's advice, cut at a word.
    gap = target_bytes - size - 1
    if gap > 1:
        advice = " ".join(rng.sample(RECOMMENDATIONS, len(RECOMMENDATIONS)))
        cut = advice[:gap].rsplit(" ", 1)[0] if len(advice) > gap else advice
        doc["summary"] += " " + cut
    return doc


# -- rows ----------------------------------------------------------------------


@dataclass
class Totals:
    """What went into the database, for the manifest."""

    counts: Counter[str] = field(default_factory=Counter)
    analysis_bytes: int = 0
    image_row_bytes: int = 0
    rows_by_kind: Counter[str] = field(default_factory=Counter)


def _patient_row(rng: random.Random, pid: int) -> dict[str, Any]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(78 * 365))
    notes = rng.sample(PATIENT_NOTES, rng.choice((0, 1, 1, 2, 3)))
    return {
        "id": pid,
        "first_name": first,
        "last_name": last,
        "birth_date": birth,
        "phone": f"+98 9{rng.randint(10, 39)} {rng.randint(100, 999)}"
        f" {rng.randint(1000, 9999)}",
        "email": f"{first}.{last}{pid}@{rng.choice(EMAIL_DOMAINS)}".lower(),
        "address": f"No. {rng.randint(1, 240)}, {rng.choice(STREETS)},"
        f" {rng.choice(CITIES)} {rng.randint(10000, 99999)}",
        "notes": " ".join(notes),
        "created_at": _instant(rng, 30, HISTORY_DAYS),
    }


def _original_name(rng: random.Random, kind: str, taken: dt.datetime, ext: str) -> str:
    prefix = KIND_NAMES[kind][0]
    if kind == "intraoral-photo":
        return f"IMG_{rng.randint(1000, 9999)}{ext.upper()}"
    if kind == "bitewing":
        return f"{prefix}_{rng.choice('LR')}_{taken:%Y%m%d_%H%M%S}{ext}"
    if kind == "periapical":
        return f"{prefix}_{rng.choice(TEETH)}_{taken:%Y%m%d_%H%M%S}{ext}"
    return f"{prefix}_{taken:%Y%m%d_%H%M%S}{ext}"


def _image_rows(
    rng: random.Random,
    analysis_rng: random.Random,
    patient: dict[str, Any],
    first_id: int,
    count: int,
    pool: dict[str, list[PoolFile]],
    analysis_bytes: int,
) -> list[dict[str, Any]]:
    kinds = list(pool)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    since = (EPOCH - patient["created_at"]).total_seconds() / 86400
    taken = sorted(_instant(rng, 0.5, since) for _ in range(count))
    rows = []
    for i, taken_at in enumerate(taken):
        kind = rng.choices(kinds, weights)[0]
        file = rng.choice(pool[kind])
        created = taken_at + dt.timedelta(seconds=rng.randint(20, 900))
        row: dict[str, Any] = {}
        if analysis_bytes:
            # Without the key the column stays SQL NULL (None would store
            # JSON null).
            row["analysis"] = analysis_document(
                analysis_rng,
                kind,
                file.width_px,
                file.height_px,
                created + dt.timedelta(seconds=rng.randint(5, 120)),
                analysis_bytes,
            )
        row.update(
            {
                "id": first_id + i,
                "patient_id": patient["id"],
                "kind": kind,
                "file_name": file.file_name,
                "original_name": _original_name(
                    rng, kind, taken_at, os.path.splitext(file.file_name)[1]
                ),
                "mime_type": file.mime_type,
                "size_bytes": file.size_bytes,
                "width_px": file.width_px,
                "height_px": file.height_px,
                "taken_at": taken_at,
                "description": f"{KIND_NAMES[kind][1]}, {rng.choice(IMAGE_PURPOSES)}",
                "created_at": created,
            }
        )
        rows.append(row)
    return rows


def exchange_rate_rows(
    rng: random.Random, currencies: tuple[str, ...], days: int
) -> list[dict[str, Any]]:
    """One rate a day per currency, a random walk, oldest first."""
    rows = []
    levels = {
        c: RATE_START.get(c, (Decimal(rng.uniform(1, 50)), 0.005)) for c in currencies
    }
    walk = {c: float(levels[c][0]) for c in currencies}
    for day in range(days, 0, -1):
        fetched = EPOCH.replace(hour=8, minute=0) - dt.timedelta(days=day - 1)
        for currency in currencies:
            start, volatility = levels[currency]
            if volatility:
                walk[currency] *= 1 + rng.gauss(0.0003, volatility)
            rate = Decimal(walk[currency]).quantize(Decimal("0.000001"))
            rows.append(
                {
                    "id": len(rows) + 1,
                    "base": BASE_CURRENCY,
                    "currency": currency,
                    "rate": rate if volatility else start,
                    "fetched_at": fetched + dt.timedelta(seconds=rng.randint(0, 600)),
                }
            )
    return rows


def _rate_lookup(rates: list[dict[str, Any]]):
    """A function giving the rate of a currency on a day (the earliest if older)."""
    by_currency: dict[str, list[tuple[dt.datetime, Decimal]]] = {}
    for row in rates:
        by_currency.setdefault(row["currency"], []).append(
            (row["fetched_at"], row["rate"])
        )

    def rate(currency: str, when: dt.datetime) -> Decimal:
        history = by_currency[currency]
        chosen = history[0][1]
        for fetched, value in history:
            if fetched > when:
                break
            chosen = value
        return chosen

    return rate


def _invoice_rows(
    rng: random.Random,
    patient: dict[str, Any],
    first_id: int,
    first_item_id: int,
    params: DatasetParams,
    rate,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    invoices, items = [], []
    since = (EPOCH - patient["created_at"]).total_seconds() / 86400
    for i in range(params.invoices_per_patient):
        invoice_id = first_id + i
        issued = _instant(rng, 0.2, since)
        currency = rng.choice(params.currencies)
        factor = rate(currency, issued)
        total = Decimal(0)
        for name, price, most in rng.sample(PROCEDURES, params.items_per_invoice):
            quantity = rng.randint(1, most)
            unit_price = _money(price * factor, currency)
            total += unit_price * quantity
            items.append(
                {
                    "id": first_item_id + len(items),
                    "invoice_id": invoice_id,
                    "description": name,
                    "quantity": quantity,
                    "unit_price": unit_price,
                }
            )
        invoices.append(
            {
                "id": invoice_id,
                "patient_id": patient["id"],
                "number": f"INV-{issued.year}-{invoice_id:06d}",
                "issued_at": issued,
                "currency": currency,
                "total": total,
                "status": _weighted(rng, INVOICE_STATUSES),
            }
        )
    return invoices, items


def user_rows(rng: random.Random, count: int) -> tuple[list[dict[str, Any]], str]:
    """Staff accounts with scrypt hashes, and the first one's password."""
    from reference_impl.security import hash_password

    rows, first_password, seen = [], "", set()
    for uid in range(1, count + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        email = f"{first}.{last}@clinic.example".lower()
        if email in seen:
            email = f"{first}.{last}{uid}@clinic.example".lower()
        seen.add(email)
        words = rng.sample(PASSWORD_WORDS, 2)
        password = f"{words[0]}-{words[1]}-{rng.randint(1000, 9999)}"
        role = "dentist" if uid == 1 else USER_ROLES[uid % len(USER_ROLES)]
        title = "Dr. " if role == "dentist" else ""
        rows.append(
            {
                "id": uid,
                "email": email,
                "name": f"{title}{first} {last}",
                "role": role,
                "password_hash": hash_password(password, salt=rng.randbytes(16)),
            }
        )
        if uid == 1:
            first_password = password
    return rows, first_password


@dataclass
class PatientBatch:
    patients: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    invoices: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)


def patient_batches(
    seed: int,
    params: DatasetParams,
    pool: list[PoolFile],
    rate,
    batch_patients: int,
) -> Iterator[PatientBatch]:
    """Patients with their images and invoices, a few at a time, in id order."""
    people = random.Random(f"{seed}/patients")
    imaging = random.Random(f"{seed}/images")
    analysis = random.Random(f"{seed}/analysis")
    billing = random.Random(f"{seed}/invoices")
    by_kind: dict[str, list[PoolFile]] = {}
    for file in pool:
        by_kind.setdefault(file.kind, []).append(file)
    target = round(params.analysis_kib * 1024)
    image_id = invoice_id = item_id = 1
    batch = PatientBatch()
    for pid in range(1, params.patients + 1):
        patient = _patient_row(people, pid)
        batch.patients.append(patient)
        if params.images_per_patient:
            images = _image_rows(
                imaging,
                analysis,
                patient,
                image_id,
                params.images_per_patient,
                by_kind,
                target,
            )
            batch.images.extend(images)
            image_id += len(images)
        invoices, items = _invoice_rows(
            billing, patient, invoice_id, item_id, params, rate
        )
        batch.invoices.extend(invoices)
        batch.items.extend(items)
        invoice_id += len(invoices)
        item_id += len(items)
        if len(batch.patients) >= batch_patients:
            yield batch
            batch = PatientBatch()
    if batch.patients:
        yield batch


# -- database ------------------------------------------------------------------


async def _insert(conn, table, rows: list[dict[str, Any]]) -> None:
    from sqlalchemy import insert

    for start in range(0, len(rows), BATCH_ROWS):
        await conn.execute(insert(table), rows[start : start + BATCH_ROWS])


def _shown(db_url: str) -> str:
    """The URL with its password masked, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return repr(make_url(db_url).render_as_string(hide_password=True))
    except Exception:
        return "(an unparsable URL)" if "@" in db_url else repr(db_url)


def check_db_url(db_url: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse or whose driver is not async."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(db_url)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError) as exc:
        raise UsageError(
            f"--db {_shown(db_url)} is not an SQLAlchemy URL"
            f" (e.g. postgresql+asyncpg://user:pass@host/db): {exc}"
        ) from exc
    if not getattr(dialect, "is_async", False):
        raise UsageError(
            f"--db {_shown(db_url)} names the synchronous driver"
            f" {url.drivername!r}; name an async one, such as postgresql+asyncpg"
            " or sqlite+aiosqlite"
        )


def _engine(db_url: str):
    from sqlalchemy.ext.asyncio import create_async_engine

    check_db_url(db_url)
    try:
        return create_async_engine(db_url, json_serializer=_compact)
    except ImportError as exc:
        raise UsageError(
            f"the driver of --db {_shown(db_url)} is not installed: {exc}"
        ) from exc


async def fill_database(
    db_url: str, seed: int, params: DatasetParams, pool: list[PoolFile]
) -> tuple[Totals, str, str]:
    """Drop and create the tables at ``db_url`` and insert the clinic.

    Returns the totals and the first user's email and password.
    """
    from sqlalchemy import event, text
    from sqlalchemy.exc import DBAPIError

    from reference_impl.models import (
        Base,
        ExchangeRate,
        Invoice,
        InvoiceItem,
        Patient,
        RadiologyImage,
        User,
    )

    engine = _engine(db_url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _fast_sqlite(dbapi_connection, record):
            # The build writes a fresh file and discards it on failure, so it
            # needs no rollback journal kept on disk nor fsync.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=MEMORY")
            cursor.execute("PRAGMA synchronous=OFF")
            cursor.close()

    totals = Totals()
    try:
        try:
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.run_sync(Base.metadata.create_all)
        except (OSError, DBAPIError) as exc:
            raise UsageError(
                f"cannot reach the database {_shown(db_url)}: {exc}"
            ) from exc
        async with engine.begin() as conn:
            users, password = user_rows(random.Random(f"{seed}/users"), params.users)
            await _insert(conn, User.__table__, users)
            rates = exchange_rate_rows(
                random.Random(f"{seed}/rates"),
                params.currencies,
                max(params.rate_days, 1),
            )
            await _insert(conn, ExchangeRate.__table__, rates)
            totals.counts.update(users=len(users), exchange_rates=len(rates))
            batches = patient_batches(
                seed, params, pool, _rate_lookup(rates), BATCH_PATIENTS
            )
            for batch in batches:
                await _insert(conn, Patient.__table__, batch.patients)
                await _insert(conn, RadiologyImage.__table__, batch.images)
                await _insert(conn, Invoice.__table__, batch.invoices)
                await _insert(conn, InvoiceItem.__table__, batch.items)
                totals.counts.update(
                    patients=len(batch.patients),
                    images=len(batch.images),
                    invoices=len(batch.invoices),
                    invoice_items=len(batch.items),
                )
                for row in batch.images:
                    if "analysis" in row:
                        totals.analysis_bytes += len(_compact(row["analysis"]))
                    totals.image_row_bytes += row["size_bytes"]
                    totals.rows_by_kind[row["kind"]] += 1
            if engine.dialect.name == "postgresql":
                # Ids were given explicitly, so the serial sequences must be
                # moved past them for later inserts (uploads) to get new ids.
                for table in Base.metadata.sorted_tables:
                    name = table.name
                    await conn.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{name}', 'id'),"
                            f" COALESCE((SELECT MAX(id) FROM {name}), 0) + 1, false)"
                        )
                    )
    finally:
        await engine.dispose()
    return totals, users[0]["email"], password


def _run(coro):
    """``asyncio.run`` that also works when called from inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(asyncio.run, coro).result()


def vacuum(path: Path) -> None:
    """Rewrite the SQLite file compactly, so its bytes follow from its rows alone."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("VACUUM")
    finally:
        con.close()


# -- the folder --------------------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise UsageError(
            f"refusing to replace {out}: it is not empty and holds no {MANIFEST_NAME},"
            " so it is not a dataset; choose another --out"
        )


def _swap_into_place(staging: Path, out: Path) -> None:
    """Put the finished folder at ``out``, replacing an older dataset there."""
    if out.exists():
        retired = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def _kind_stats(pool: list[PoolFile], rows_by_kind: Counter[str]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for kind in imagegen.KINDS:
        files = [f for f in pool if f.kind == kind]
        if not files:
            continue
        sizes = [f.size_bytes for f in files]
        stats[kind] = {
            "files": len(files),
            "rows": rows_by_kind[kind],
            "mime_type": files[0].mime_type,
            "width_px": files[0].width_px,
            "height_px": files[0].height_px,
            "bytes_min": min(sizes),
            "bytes_max": max(sizes),
            "bytes_mean": round(sum(sizes) / len(sizes)),
        }
    return stats


def build_dataset(
    params: DatasetParams,
    out: Path,
    *,
    preset: str = "custom",
    seed: int = DEFAULT_SEED,
    db_url: str | None = None,
) -> dict[str, Any]:
    """Build a dataset from explicit parameters into ``out``; see :func:`build`."""
    out = Path(out)
    _check_replaceable(out)
    if db_url is not None:
        check_db_url(db_url)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        images_dir = staging / IMAGES_DIR
        started = time.perf_counter()
        pool = write_pool(seed, params.distinct_images, params.image_scale, images_dir)
        log.info(
            "wrote %d image files in %.1f s", len(pool), time.perf_counter() - started
        )
        database = staging / DATABASE_NAME if db_url is None else None
        url = db_url or sqlite_url(staging / DATABASE_NAME)
        started = time.perf_counter()
        totals, email, password = _run(fill_database(url, seed, params, pool))
        log.info(
            "inserted %d patients and %d image rows in %.1f s",
            totals.counts["patients"],
            totals.counts["images"],
            time.perf_counter() - started,
        )
        if database is not None:
            vacuum(database)
        manifest = {
            "format": MANIFEST_FORMAT,
            "preset": preset,
            "seed": seed,
            "parameters": params.as_json(),
            "database": DATABASE_NAME if database is not None else None,
            "images": IMAGES_DIR,
            "counts": {
                "patients": totals.counts["patients"],
                "images": totals.counts["images"],
                "distinct_image_files": len(pool),
                "invoices": totals.counts["invoices"],
                "invoice_items": totals.counts["invoice_items"],
                "exchange_rates": totals.counts["exchange_rates"],
                "users": totals.counts["users"],
            },
            "bytes": {
                "database": database.stat().st_size if database is not None else None,
                "images": _folder_bytes(images_dir),
                "image_rows": totals.image_row_bytes,
                "analysis": totals.analysis_bytes,
                "analysis_mean": round(totals.analysis_bytes / totals.counts["images"])
                if totals.counts["images"]
                else 0,
            },
            "image_kinds": _kind_stats(pool, totals.rows_by_kind),
            "login": {
                "email": email,
                "password": password,
                "note": "synthetic demo credentials of a synthetic user",
            },
        }
        if db_url is not None:
            manifest["db_url"] = db_url
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def build(
    preset: str,
    out: Path | None = None,
    seed: int = DEFAULT_SEED,
    db_url: str | None = None,
) -> dict[str, Any]:
    """Build ``preset``'s dataset into ``out`` and return its manifest.

    ``out`` defaults to ``datasets/<preset>/``; a dataset already there is
    replaced whole, so the folder holds only what this build wrote.
    """
    params = DatasetParams.from_table(
        load_preset(preset).dataset, where=f"preset {preset!r}"
    )
    out = Path(out) if out is not None else default_dataset_dir(preset)
    return build_dataset(params, out, preset=preset, seed=seed, db_url=db_url)


# -- command line ----------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def report(manifest: dict[str, Any], out: Path, elapsed_s: float) -> str:
    counts, sizes = manifest["counts"], manifest["bytes"]
    lines = [
        f"built preset {manifest['preset']!r} (seed {manifest['seed']}) into {out}"
        f" in {elapsed_s:.1f} s",
        f"  patients {counts['patients']}, image rows {counts['images']}"
        f" ({counts['distinct_image_files']} distinct files), invoices"
        f" {counts['invoices']} ({counts['invoice_items']} items), exchange rates"
        f" {counts['exchange_rates']}, users {counts['users']}",
        f"  database {_mib(sizes['database'])}"
        + (f" at {_shown(manifest['db_url'])}" if manifest.get("db_url") else "")
        + f", image files {_mib(sizes['images'])}, analysis JSON"
        f" {_mib(sizes['analysis'])} ({sizes['analysis_mean'] / 1024:.1f} KiB a row)",
    ]
    for kind, stats in manifest["image_kinds"].items():
        lines.append(
            f"  {kind:<16} {stats['files']:>4} files {stats['rows']:>6} rows"
            f"  {stats['width_px']}x{stats['height_px']}"
            f"  {stats['bytes_min'] / 1e6:.2f}-{stats['bytes_max'] / 1e6:.2f} MB"
        )
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    build_parser = sub.add_parser(
        "build",
        help="build a synthetic clinic dataset",
        description="Write the SQLite database, the image files and manifest.json"
        " of a preset. The same seed gives the same bytes.",
    )
    build_parser.add_argument(
        "--preset",
        default="ci",
        metavar="NAME",
        help=f"a preset of datasets/presets.toml ({', '.join(PRESET_NAMES)});"
        " default: ci",
    )
    build_parser.add_argument(
        "--out", metavar="DIR", help="dataset folder (default: datasets/PRESET)"
    )
    build_parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"default: {DEFAULT_SEED}"
    )
    build_parser.add_argument(
        "--db",
        metavar="URL",
        help="an async SQLAlchemy URL to put the rows in instead of an SQLite file"
        " (its clinic tables are dropped first)",
    )


def main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_dataset_dir(args.preset)
    started = time.perf_counter()
    manifest = build(args.preset, out=out, seed=args.seed, db_url=args.db)
    print(report(manifest, out, time.perf_counter() - started))
    return 0
