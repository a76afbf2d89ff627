"""JSON shapes of the API (camelCase, as the original answered).

Both forms of a pattern render through these functions, so a difference in
memory comes from what is loaded, never from how it is printed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from reference_impl.models import Invoice, Patient, RadiologyImage

PATIENT_FIELDS = (
    "id",
    "first_name",
    "last_name",
    "birth_date",
    "phone",
    "email",
    "address",
    "notes",
    "created_at",
)
IMAGE_METADATA_FIELDS = (
    "id",
    "patient_id",
    "kind",
    "file_name",
    "original_name",
    "mime_type",
    "size_bytes",
    "width_px",
    "height_px",
    "taken_at",
    "description",
    "created_at",
)
IMAGE_FIELDS = (*IMAGE_METADATA_FIELDS, "analysis")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def fields_json(source: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Render ``names`` of an ORM object or a result row (a mapping) as camelCase."""
    if isinstance(source, Mapping):
        return {camel(n): plain(source[n]) for n in names}
    return {camel(n): plain(getattr(source, n)) for n in names}


def image_json(image: RadiologyImage | Mapping[str, Any], *, full: bool) -> dict:
    return fields_json(image, IMAGE_FIELDS if full else IMAGE_METADATA_FIELDS)


def patient_json(patient: Patient) -> dict[str, Any]:
    """A patient with every image row, as ``include: {radiologyImages: true}``."""
    out = fields_json(patient, PATIENT_FIELDS)
    out["radiologyImages"] = [
        image_json(image, full=True) for image in patient.radiology_images
    ]
    return out


def patient_summary_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A patient's selected columns and its image count."""
    out = fields_json(row, PATIENT_FIELDS)
    out["imageCount"] = row["image_count"]
    return out


def invoice_json(invoice: Invoice) -> dict[str, Any]:
    out = fields_json(
        invoice,
        ("id", "patient_id", "number", "issued_at", "currency", "total", "status"),
    )
    out["items"] = [
        fields_json(item, ("id", "description", "quantity", "unit_price"))
        for item in invoice.items
    ]
    return out


def pagination_json(page: int, limit: int, total: int) -> dict[str, int]:
    return {
        "page": page,
        "limit": limit,
        "total": total,
        "totalPages": (total + limit - 1) // limit,
    }
