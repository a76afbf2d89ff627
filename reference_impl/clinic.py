"""Routes that no fix touched: invoices, exchange rates and login.

They differ between the forms only through the ``client`` pattern (the
original left them creating their own database client) and, for login,
through how the JSON body is read (``body-limit``).
"""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from starlette.requests import Request
from starlette.responses import JSONResponse

from reference_impl.errors import ApiError, bad_request, not_found
from reference_impl.models import ExchangeRate, Invoice, User
from reference_impl.params import page_params
from reference_impl.patterns.body_limit import require_object
from reference_impl.security import make_token, verify_password
from reference_impl.serialize import invoice_json, pagination_json, plain


async def list_invoices(request: Request) -> JSONResponse:
    """Invoices with their line items, 20 a page."""
    page = page_params(request)
    async with request.app.state.db.session("invoices") as session:
        total = await session.scalar(select(func.count(Invoice.id)))
        invoices = await session.scalars(
            select(Invoice)
            .options(selectinload(Invoice.items))
            .order_by(Invoice.id)
            .limit(page.limit)
            .offset(page.offset)
        )
        data = [invoice_json(invoice) for invoice in invoices]
    return JSONResponse(
        {"data": data, "pagination": pagination_json(page.page, page.limit, total)}
    )


async def exchange_rate(request: Request) -> JSONResponse:
    """The latest rate of one currency."""
    currency = request.query_params.get("currency", "").strip().upper()
    if not currency:
        raise bad_request(
            "missing_currency", "the query parameter currency is required"
        )
    if len(currency) != 3 or not currency.isalpha() or not currency.isascii():
        raise bad_request(
            "invalid_currency", f"currency={currency!r} is not a 3-letter code"
        )
    async with request.app.state.db.session("exchange-rate") as session:
        rate = await session.scalar(
            select(ExchangeRate)
            .where(ExchangeRate.currency == currency)
            .order_by(ExchangeRate.fetched_at.desc())
            .limit(1)
        )
    if rate is None:
        raise not_found(f"no exchange rate is known for {currency}")
    return JSONResponse(
        {
            "base": rate.base,
            "currency": rate.currency,
            "rate": plain(rate.rate),
            "fetchedAt": plain(rate.fetched_at),
        }
    )


def _required_text(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None:
        raise bad_request("missing_field", f"the field {name!r} is required")
    if not isinstance(value, str) or not value:
        raise bad_request(
            "invalid_field", f"the field {name!r} must be a non-empty string"
        )
    return value


async def login(request: Request) -> JSONResponse:
    """Check an email and password; answer a token or 401."""
    body = require_object(await request.app.state.read_json(request))
    email = _required_text(body, "email").strip().lower()
    password = _required_text(body, "password")
    async with request.app.state.db.session("auth") as session:
        user = await session.scalar(select(User).where(User.email == email))
    stored = user.password_hash if user is not None else request.app.state.dummy_hash
    # scrypt takes ~50 ms of CPU: run it on the app's password thread so the
    # event loop keeps serving other requests meanwhile.
    matches = await asyncio.get_running_loop().run_in_executor(
        request.app.state.password_hasher, verify_password, password, stored
    )
    if user is None or not matches:
        raise ApiError(401, "invalid_credentials", "the email or password is wrong")
    return JSONResponse(
        {
            "token": make_token(user.id, request.app.state.token_secret),
            "user": {
                "id": user.id,
                "email": user.email,
                "name": user.name,
                "role": user.role,
            },
        }
    )
