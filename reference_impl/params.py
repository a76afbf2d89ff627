"""Validation of path and query parameters, shared by every route."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from reference_impl.errors import ApiError, bad_request

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: Ids are SQLite/PostgreSQL integers; larger values cannot name a row.
MAX_ID = 2**63 - 1


def _positive_int(raw: str, name: str) -> int:
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        raise bad_request(
            f"invalid_{name}", f"{name}={raw!r} is not a positive integer"
        )
    value = int(text)
    if value < 1:
        raise bad_request(f"invalid_{name}", f"{name}={raw!r} must be at least 1")
    return value


def path_id(request: Request, name: str = "id") -> int:
    raw = request.path_params[name]
    value = _positive_int(raw, name)
    if value > MAX_ID:
        raise ApiError(404, "not_found", f"{name}={raw} names no row")
    return value


@dataclass(frozen=True)
class Page:
    page: int
    limit: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.limit


def page_params(request: Request) -> Page:
    """``page`` (from 1) and ``limit`` (1..100, default 20); anything else is a 400."""
    query = request.query_params
    page = _positive_int(query["page"], "page") if "page" in query else 1
    limit = (
        _positive_int(query["limit"], "limit") if "limit" in query else DEFAULT_LIMIT
    )
    if limit > MAX_LIMIT:
        raise bad_request(
            "invalid_limit", f"limit={limit} exceeds the maximum of {MAX_LIMIT}"
        )
    if page > MAX_ID // MAX_LIMIT:
        raise bad_request("invalid_page", f"page={page} is beyond any possible page")
    return Page(page=page, limit=limit)
