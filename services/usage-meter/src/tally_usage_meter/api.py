"""usage-meter HTTP API: ``POST /v1/usage``, ``GET /v1/prices``, ``PUT /v1/prices/{service}``.
Routes parse, authorise, call one use case and render (``schemas``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Request, Response

from tally.auth import CurrentPrincipal, Principal, require_role
from tally_usage_meter import prices
from tally_usage_meter.schemas import (
    SERVICE_RE,
    USAGE_SCHEMA,
    PriceIn,
    PriceList,
    PriceOut,
    parse_usage_body,
    price_out,
)
from tally_usage_meter.wiring import UsageMeterWiring, Wired, wired

router = APIRouter(prefix="/v1", tags=["usage"])


@router.post(
    "/usage",
    status_code=202,
    openapi_extra=USAGE_SCHEMA,
    summary="Record usage (one event or a batch of up to 1000)",
    description=(
        "An event is known by its `event_id` within its company: the same id from the same "
        "company again is answered `duplicate` and never charged twice; another company's "
        "event with the same id is another event."
    ),
)
async def post_usage(request: Request, principal: CurrentPrincipal) -> Response:
    # described here (OpenAPI); served by ``record_usage`` in front of the framework (app.py)
    status, payload = await record_usage(
        wired(request), principal, await request.body(), dict(request.headers.raw)
    )
    return Response(payload, status_code=status, media_type="application/json")


async def record_usage(
    w: UsageMeterWiring, principal: Principal, body: bytes, headers: Mapping[bytes, bytes]
) -> tuple[int, bytes]:
    """``POST /v1/usage``: every usage event a product posts comes this way (tally.edge)."""
    require_role(principal, "product", "platform_admin")
    batch = parse_usage_body(body)
    traceparent = headers.get(b"traceparent")
    results = await w.ingestion.record(
        f"{principal.role}:{principal.sub}", batch, traceparent.decode("latin-1") if traceparent else None
    )
    return 202, orjson.dumps({"results": [r.as_json() for r in results]})


@router.get("/prices", summary="The platform price catalog")
async def get_prices(principal: CurrentPrincipal, w: Wired) -> PriceList:
    return PriceList(items=[price_out(p) for p in await prices.catalog(w.db)])


ServiceName = Annotated[str, Path(pattern=SERVICE_RE.pattern)]


@router.put("/prices/{service}", summary="Set a service's platform price (applies to new events)")
async def put_price(service: ServiceName, body: PriceIn, principal: CurrentPrincipal, w: Wired) -> PriceOut:
    require_role(principal, "platform_admin")
    price = body.price(service)
    return price_out(await prices.set_price(w.uow(), price))
