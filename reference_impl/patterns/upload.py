"""Pattern ``upload``: ``POST /api/patients/{id}/images`` (being written)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from reference_impl.errors import ApiError


async def upload_image_naive(request: Request) -> JSONResponse:
    raise ApiError(501, "not_implemented", "upload is not implemented yet")


upload_image_optimized = upload_image_naive
