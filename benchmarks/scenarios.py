"""Benchmark scenarios: which routes a load sends, in what mix, and which
answers count as correct.

A scenario is a weighted mix of routes. The one-pattern scenarios send the
route their pattern is about; ``clinic`` mixes every route in the weights of
the preset's ``[NAME.loads.clinic.weights]``; ``soak`` is a long ``clinic``
mix for the optimized server (leaks show as a slope). A preset may give any
scenario a ``weights`` table.

The soak's RSS slope comes from glibc, not from Python objects. Freeing a
block that glibc had mmap()ed raises its mmap threshold to that block's size
(up to 32 MiB) and its trim threshold to twice that. Login's scrypt takes a
16 MiB buffer, so after the first one every buffer below 16 MiB (scrypt's
own, uploads, images) comes from a per-thread malloc arena, which keeps
what is freed: RSS climbs in steps as arenas fill, early or late in a run,
so the slope varies from run to run, and ``gc.collect()`` frees nothing.
With the threshold pinned (``--malloc-mmap-threshold 131072``, glibc's default) or
with ``--malloc-arena-max 2`` the slope is flat; the server leaves glibc's
defaults alone so that the runs show what a deployment would see.

Each route has the statuses that are its correct answers. An oversized JSON
body is *meant* to be refused: the optimized server answers 413 and the
naive one reads it whole and answers 200, and both count as ``ok``; any
other status, and every request that got no answer, counts as failed.

The plan is drawn from a ``random.Random(seed)``: the same seed gives the
same requests, in the same order, to every variant.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks.load import Request
from reference_impl.errors import UsageError

#: Rows a page holds in every paginated request the harness sends.
PAGE_LIMIT = 20


@dataclass(frozen=True)
class Route:
    """One kind of request of the clinic API."""

    name: str
    expected: frozenset[int]
    label: str


ROUTES: dict[str, Route] = {
    route.name: route
    for route in (
        Route("patients", frozenset({200}), "GET /api/patients?page=&limit=20"),
        Route("patient", frozenset({200}), "GET /api/patients/{id}"),
        Route("images", frozenset({200}), "GET /api/patients/{id}/images?page=1"),
        Route("upload", frozenset({201}), "POST /api/patients/{id}/images"),
        Route("diagnosis", frozenset({200}), "POST /api/ai/dental-diagnosis"),
        Route("invoices", frozenset({200}), "GET /api/invoices?page=&limit=20"),
        Route("exchange_rate", frozenset({200}), "GET /api/exchange-rate?currency="),
        Route("login", frozenset({200}), "POST /api/auth/login"),
        Route(
            "oversized_body",
            frozenset({200, 413}),
            "POST /api/auth/login with a body of body_mib MiB",
        ),
    )
}


@dataclass(frozen=True)
class Scenario:
    """A named load: its route mix and the pattern it is about."""

    name: str
    doc: str
    weights: Mapping[str, float]
    pattern: str | None = None
    #: The variants a bare ``membench run SCENARIO`` compares.
    default_variants: tuple[str, ...] = ("naive", "optimized")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "listing",
            "every patient with every image row, against 20 a page",
            {"patients": 1},
            "listing",
        ),
        Scenario(
            "images",
            "a patient's image rows with all columns, against metadata a page",
            {"images": 1},
            "images",
        ),
        Scenario(
            "client",
            "an engine per request, against one pool per process",
            {"exchange_rate": 1, "invoices": 1},
            "client",
        ),
        Scenario(
            "upload",
            "whole uploads held in memory, against streamed to disk",
            {"upload": 1},
            "upload",
        ),
        Scenario(
            "encoding",
            "images base64-encoded all at once, against one at a time",
            {"diagnosis": 1},
            "encoding",
        ),
        Scenario(
            "body-limit",
            "oversized JSON bodies read whole, against refused with 413",
            {"oversized_body": 1},
            "body-limit",
        ),
        Scenario(
            "clinic",
            "a mix over every route in the preset's proportions",
            {},
        ),
        Scenario(
            "soak",
            "a long clinic mix: RSS, threads and open files must stay flat",
            {},
            default_variants=("optimized",),
        ),
    )
}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UsageError(
            f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}"
        ) from None


def weights_for(name: str, load: Mapping[str, Any]) -> dict[str, float]:
    """The route weights of a scenario: the preset's table, else its own."""
    weights = dict(load.get("weights") or scenario(name).weights)
    unknown = sorted(set(weights) - set(ROUTES))
    if unknown:
        raise UsageError(
            f"scenario {name!r} weights name unknown route(s) {', '.join(unknown)};"
            f" known: {', '.join(ROUTES)}"
        )
    weights = {route: float(w) for route, w in weights.items() if float(w) > 0}
    if not weights:
        raise UsageError(f"scenario {name!r} has no route with a positive weight")
    return weights


@dataclass
class Context:
    """What a plan needs to know of the dataset and of the files it sends."""

    patients: int
    invoices: int
    currencies: list[str]
    email: str
    password: str
    upload_file: tuple[str, bytes, str] | None = None
    oversized_json: bytes | None = None
    diagnosis_patient: int | None = None
    diagnosis_images: list[int] = field(default_factory=list)
    #: When set, image lists are asked of this patient (a long history).
    history_patient: int | None = None


def oversized_login(email: str, password: str, size_bytes: int) -> bytes:
    """A valid login body padded with a ``note`` field to ``size_bytes``."""
    head = json.dumps({"email": email, "password": password, "note": ""}).encode()
    pad = max(0, size_bytes - len(head))
    return head[:-2] + b"x" * pad + head[-2:]


def _request(route: str, rng: random.Random, ctx: Context) -> Request:
    patient = rng.randint(1, ctx.patients)
    if route == "patients":
        pages = max(1, math.ceil(ctx.patients / PAGE_LIMIT))
        page = rng.randint(1, pages)
        return Request(route, "GET", f"/api/patients?page={page}&limit={PAGE_LIMIT}")
    if route == "patient":
        return Request(route, "GET", f"/api/patients/{patient}")
    if route == "images":
        owner = ctx.history_patient or patient
        return Request(
            route, "GET", f"/api/patients/{owner}/images?page=1&limit={PAGE_LIMIT}"
        )
    if route == "upload":
        assert ctx.upload_file is not None, "the plan needs an upload file"
        return Request(
            route, "POST", f"/api/patients/{patient}/images", file=ctx.upload_file
        )
    if route == "diagnosis":
        assert ctx.diagnosis_patient is not None, "the plan needs diagnosis images"
        # No imageIds: the route takes the patient's most recent images, as
        # many as the form allows (10 naive, 5 optimized); the setup uploads
        # are the most recent.
        body = {"patientId": ctx.diagnosis_patient}
        return Request(
            route,
            "POST",
            "/api/ai/dental-diagnosis",
            json_bytes=json.dumps(body).encode(),
        )
    if route == "invoices":
        pages = max(1, math.ceil(ctx.invoices / PAGE_LIMIT))
        page = rng.randint(1, pages)
        return Request(route, "GET", f"/api/invoices?page={page}&limit={PAGE_LIMIT}")
    if route == "exchange_rate":
        currency = rng.choice(ctx.currencies)
        return Request(route, "GET", f"/api/exchange-rate?currency={currency}")
    if route == "login":
        body = {"email": ctx.email, "password": ctx.password}
        return Request(
            route, "POST", "/api/auth/login", json_bytes=json.dumps(body).encode()
        )
    if route == "oversized_body":
        assert ctx.oversized_json is not None, "the plan needs an oversized body"
        return Request(
            route,
            "POST",
            "/api/auth/login",
            json_bytes=ctx.oversized_json,
            early_answer=True,
        )
    raise ValueError(f"unknown route {route!r}")


def build_plan(
    weights: Mapping[str, float], count: int, rng: random.Random, ctx: Context
) -> list[Request]:
    """``count`` requests drawn by ``weights`` (route name -> weight)."""
    routes = list(weights)
    cumulative = list(itertools.accumulate(weights[r] for r in routes))
    picks = rng.choices(routes, cum_weights=cumulative, k=count)
    return [_request(route, rng, ctx) for route in picks]


def is_ok(route: str, status: int) -> bool:
    return status in ROUTES[route].expected
