"""Pattern ``encoding``: ``POST /api/ai/dental-diagnosis`` (being written)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from reference_impl.errors import ApiError


async def diagnose_naive(request: Request) -> JSONResponse:
    raise ApiError(501, "not_implemented", "diagnosis is not implemented yet")


diagnose_optimized = diagnose_naive
diagnose_plus = diagnose_naive
