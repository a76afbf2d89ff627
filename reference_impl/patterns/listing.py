"""Patterns ``listing``: ``GET /api/patients`` and ``GET /api/patients/{id}``.

Naive loads every patient with every image row and all its columns (Prisma's
``include: {radiologyImages: true}``). Optimized selects the columns it
returns, counts images in the same query, and paginates.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from starlette.requests import Request
from starlette.responses import JSONResponse

from reference_impl.errors import not_found
from reference_impl.models import Patient, RadiologyImage
from reference_impl.params import page_params, path_id
from reference_impl.serialize import (
    PATIENT_FIELDS,
    pagination_json,
    patient_json,
    patient_summary_json,
)

MODULE = "patients"


def _summary_query():
    """Patient columns plus their image count, one query, no row per image."""
    image_count = (
        select(func.count(RadiologyImage.id))
        .where(RadiologyImage.patient_id == Patient.id)
        .correlate(Patient)
        .scalar_subquery()
        .label("image_count")
    )
    columns = [getattr(Patient, name) for name in PATIENT_FIELDS]
    return select(*columns, image_count)


async def list_patients_naive(request: Request) -> JSONResponse:
    """Every patient, every image row, every column."""
    async with request.app.state.db.session(MODULE) as session:
        result = await session.scalars(
            select(Patient)
            .options(selectinload(Patient.radiology_images))
            .order_by(Patient.id)
        )
        patients = [patient_json(p) for p in result]
    return JSONResponse(patients)


async def list_patients_optimized(request: Request) -> JSONResponse:
    """Selected columns, an image count, 20 a page."""
    page = page_params(request)
    async with request.app.state.db.session(MODULE) as session:
        total = await session.scalar(select(func.count(Patient.id)))
        rows = await session.execute(
            _summary_query().order_by(Patient.id).limit(page.limit).offset(page.offset)
        )
        data = [patient_summary_json(row) for row in rows.mappings()]
    return JSONResponse(
        {"data": data, "pagination": pagination_json(page.page, page.limit, total)}
    )


async def get_patient_naive(request: Request) -> JSONResponse:
    """One patient with every image row included."""
    patient_id = path_id(request)
    async with request.app.state.db.session(MODULE) as session:
        patient = await session.scalar(
            select(Patient)
            .options(selectinload(Patient.radiology_images))
            .where(Patient.id == patient_id)
        )
        if patient is None:
            raise not_found(f"patient {patient_id} does not exist")
        body = patient_json(patient)
    return JSONResponse(body)


async def get_patient_optimized(request: Request) -> JSONResponse:
    """One patient's selected columns and its image count."""
    patient_id = path_id(request)
    async with request.app.state.db.session(MODULE) as session:
        row = (
            (await session.execute(_summary_query().where(Patient.id == patient_id)))
            .mappings()
            .first()
        )
    if row is None:
        raise not_found(f"patient {patient_id} does not exist")
    return JSONResponse(patient_summary_json(row))
