"""The clinic API's app factory: one Starlette app per ``Settings``.

Each pattern contributes its naive or optimized handler; everything else
(models, serialization, validation, errors) is shared, so the two forms of a
pattern differ only in what the pattern is about.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import httpx
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reference_impl import clinic, procstats
from reference_impl.config import PATTERNS, Settings
from reference_impl.errors import ApiError
from reference_impl.patterns import (
    body_limit,
    client,
    encoding,
    images,
    listing,
    upload,
)
from reference_impl.security import hash_password

log = logging.getLogger("reference_impl")


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status,
        headers=headers,
    )


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    # A refused body may still be arriving: closing the connection afterwards
    # spares the server from reading the rest.
    headers = {"Connection": "close"} if exc.status == 413 else None
    return error_response(exc.status, exc.code, exc.message, headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    return error_response(
        exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"
    )


async def _database_error(request: Request, exc: OperationalError) -> JSONResponse:
    if "locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower():
        return error_response(
            503,
            "database_busy",
            "the database is busy; retry shortly",
            {"Retry-After": "1"},
        )
    log.exception("database error on %s %s", request.method, request.url.path)
    return error_response(500, "database_error", "the database failed to answer")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "the server failed to answer")


async def health(request: Request) -> JSONResponse:
    settings: Settings = request.app.state.settings
    return JSONResponse(
        {
            "status": "ok",
            "variant": settings.variant,
            "naivePatterns": [p for p in PATTERNS if settings.is_naive(p)],
            "plusPatterns": sorted(settings.plus),
        }
    )


async def debug_stats(request: Request) -> JSONResponse:
    """Engines and connections counted so far, and what the process holds."""
    return JSONResponse(
        {
            "database": request.app.state.db_stats.as_json(),
            "process": procstats.snapshot(),
        }
    )


async def debug_release(request: Request) -> JSONResponse:
    """RSS as is, after gc.collect() and after malloc_trim(0), in that order."""
    params = request.query_params
    result = procstats.release(
        collect=params.get("gc", "1") != "0", trim=params.get("trim", "1") != "0"
    )
    return JSONResponse(result)


def _pick(settings: Settings, pattern: str, naive, optimized, plus=None):
    if settings.is_naive(pattern):
        return naive
    if plus is not None and settings.is_plus(pattern):
        return plus
    return optimized


def create_app(settings: Settings) -> Starlette:
    s = settings
    routes = [
        Route("/healthz", health),
        Route("/debug/stats", debug_stats),
        Route("/debug/release", debug_release, methods=["POST"]),
        Route(
            "/api/patients",
            _pick(
                s,
                "listing",
                listing.list_patients_naive,
                listing.list_patients_optimized,
            ),
        ),
        Route(
            "/api/patients/{id}",
            _pick(
                s, "listing", listing.get_patient_naive, listing.get_patient_optimized
            ),
        ),
        Route(
            "/api/patients/{id}/images",
            _pick(s, "images", images.list_images_naive, images.list_images_optimized),
        ),
        Route(
            "/api/patients/{id}/images",
            _pick(
                s, "upload", upload.upload_image_naive, upload.upload_image_optimized
            ),
            methods=["POST"],
        ),
        Route(
            "/api/ai/dental-diagnosis",
            _pick(
                s,
                "encoding",
                encoding.diagnose_naive,
                encoding.diagnose_optimized,
                encoding.diagnose_plus,
            ),
            methods=["POST"],
        ),
        Route("/api/invoices", clinic.list_invoices),
        Route("/api/exchange-rate", clinic.exchange_rate),
        Route("/api/auth/login", clinic.login, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        s.storage_dir.mkdir(parents=True, exist_ok=True)
        await app.state.db.start()
        # Login checks passwords on this one thread, not on anyio's pool: each
        # scrypt call takes a 16 MiB buffer, and once glibc has raised its
        # mmap threshold past that size the buffer comes from the calling
        # thread's malloc arena and stays cached there. On one thread at most
        # one buffer is live and one arena holds it; logins queue (~50 ms
        # each) instead of spreading 16 MiB over every worker thread.
        app.state.password_hasher = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="password-hash"
        )
        async with httpx.AsyncClient(timeout=s.ai_timeout_s) as ai_client:
            app.state.ai_client = ai_client
            log.info("serving variant=%s naive=%s", s.variant, sorted(s.naive))
            try:
                yield
            finally:
                app.state.password_hasher.shutdown(wait=False, cancel_futures=True)
                await app.state.db.stop()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            OperationalError: _database_error,
            Exception: _unexpected,
        },
    )
    app.state.settings = s
    app.state.db_stats = client.EngineStats()
    app.state.db = client.database_for(
        s.is_naive("client"), s.db_url, app.state.db_stats, pool=s.pool_size
    )
    app.state.read_json = _pick(
        s, "body-limit", body_limit.read_json_naive, body_limit.read_json_limited
    )
    app.state.token_secret = secrets.token_bytes(32)
    # Login verifies against this when the email is unknown, so a wrong email
    # costs as much time as a wrong password.
    app.state.dummy_hash = hash_password(secrets.token_hex(8))
    return app
