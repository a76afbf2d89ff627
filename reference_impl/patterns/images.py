"""Pattern ``images``: ``GET /api/patients/{id}/images``.

Naive returns every image row of the patient with all its columns, analysis
documents included. Optimized returns metadata only, 20 a page.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import JSONResponse

from reference_impl.errors import not_found
from reference_impl.models import Patient, RadiologyImage
from reference_impl.params import page_params, path_id
from reference_impl.serialize import IMAGE_METADATA_FIELDS, image_json, pagination_json

MODULE = "images"


async def require_patient(session: AsyncSession, patient_id: int) -> None:
    if await session.get(Patient, patient_id) is None:
        raise not_found(f"patient {patient_id} does not exist")


async def list_images_naive(request: Request) -> JSONResponse:
    """Every image row of the patient, every column."""
    patient_id = path_id(request)
    async with request.app.state.db.session(MODULE) as session:
        await require_patient(session, patient_id)
        images = await session.scalars(
            select(RadiologyImage)
            .where(RadiologyImage.patient_id == patient_id)
            .order_by(RadiologyImage.id)
        )
        data = [image_json(image, full=True) for image in images]
    return JSONResponse(data)


async def list_images_optimized(request: Request) -> JSONResponse:
    """Metadata columns only, 20 a page."""
    patient_id = path_id(request)
    page = page_params(request)
    columns = [getattr(RadiologyImage, name) for name in IMAGE_METADATA_FIELDS]
    async with request.app.state.db.session(MODULE) as session:
        await require_patient(session, patient_id)
        total = await session.scalar(
            select(func.count(RadiologyImage.id)).where(
                RadiologyImage.patient_id == patient_id
            )
        )
        rows = await session.execute(
            select(*columns)
            .where(RadiologyImage.patient_id == patient_id)
            .order_by(RadiologyImage.id)
            .limit(page.limit)
            .offset(page.offset)
        )
        data = [image_json(row, full=False) for row in rows.mappings()]
    return JSONResponse(
        {"data": data, "pagination": pagination_json(page.page, page.limit, total)}
    )
