"""usage-meter HTTP API: ``POST /v1/usage``, ``GET /v1/prices``, ``PUT /v1/prices/{service}``."""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from tally.auth import CurrentPrincipal, require_role
from tally.errors import ApiError, JsonResponse, money_field
from tally.events import UsageEvent
from tally.groupcommit import GroupCommit
from tally.ids import PathKey
from tally.money import format_micros
from tally.ratelimit import TokenBuckets, retry_after
from tally.service import Runtime, runtime
from tally.telemetry import continue_trace
from tally_usage_meter import storage
from tally_usage_meter.domain import Price
from tally_usage_meter.ingestion import DirectoryUnavailable, Result, ingest

router = APIRouter(prefix="/v1", tags=["usage"])

MAX_BATCH = 1000
SERVICE_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")

_USAGE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        UsageEvent.model_json_schema(ref_template="#/components/schemas/{model}"),
                        {
                            "type": "object",
                            "required": ["events"],
                            "properties": {
                                "events": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": MAX_BATCH,
                                    "items": UsageEvent.model_json_schema(
                                        ref_template="#/components/schemas/{model}"
                                    ),
                                }
                            },
                        },
                    ]
                }
            }
        },
    }
}


def _invalid(message: str, details: list[Any] | None = None) -> ApiError:
    return ApiError(422, "validation_error", message, details)


class _Batch(BaseModel):
    events: list[UsageEvent] = Field(min_length=1, max_length=MAX_BATCH)


_BATCH = TypeAdapter(_Batch)


def parse_usage_body(raw: bytes) -> list[UsageEvent]:
    """One event or ``{"events": [...]}`` (1-1000). Anything malformed: 422, nothing taken."""
    try:  # the common case, a valid batch, in one pass from bytes
        return _BATCH.validate_json(raw).events
    except ValidationError:
        pass  # one event, or something wrong: the detailed path says what
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _invalid('body must be a usage event object or {"events": [...]}')
    if "events" in data:
        items = data["events"]
        if not isinstance(items, list) or not items:
            raise _invalid("events must be a non-empty array")
        if len(items) > MAX_BATCH:
            raise _invalid(f"a batch holds at most {MAX_BATCH} events, got {len(items)}")
        prefix = "events"
    else:
        items, prefix = [data], ""
    parsed, details = [], []
    for i, item in enumerate(items):
        try:
            parsed.append(UsageEvent.model_validate(item))
        except ValidationError as exc:
            for err in exc.errors()[:10]:
                loc = ".".join(str(p) for p in err["loc"])
                field = f"{prefix}[{i}].{loc}" if prefix else loc
                details.append({"field": field, "message": err["msg"]})
    if details:
        first = details[0]
        raise _invalid(f"{first['field']}: {first['message']}", details[:100])
    return parsed


@router.post(
    "/usage",
    status_code=202,
    openapi_extra=_USAGE_SCHEMA,
    summary="Record usage (one event or a batch of up to 1000)",
)
async def post_usage(request: Request, principal: CurrentPrincipal) -> JsonResponse:
    require_role(principal, "product", "platform_admin")
    batch = parse_usage_body(await request.body())
    rt = runtime(request)
    limiter: TokenBuckets = rt.state.setdefault(
        "ingest_limiter", TokenBuckets(rt.settings.ingest_rate, rt.settings.ingest_burst)
    )
    wait = limiter.take(f"{principal.role}:{principal.sub}", len(batch))
    if wait:
        raise ApiError(
            429,
            "rate_limited",
            "too many usage events for this token; retry later",
            headers={"Retry-After": retry_after(wait)},
        )
    with continue_trace(
        request.headers.get("traceparent"), "usage.ingest", {"tally.events": len(batch)}
    ) as traceparent:
        try:
            results = await _ingest_group(rt).submit([(e, traceparent) for e in batch])
        except DirectoryUnavailable as exc:
            raise ApiError(
                503,
                "rebilling_unavailable",
                "the company's currency cannot be looked up right now; nothing was recorded, try again",
                headers={"Retry-After": "2"},
            ) from exc
    return JsonResponse({"results": [r.as_json() for r in results]}, status_code=202)


def _ingest_group(rt: Runtime) -> GroupCommit[tuple[UsageEvent, str | None], Result]:
    """Concurrent requests' batches go in one transaction (tally.groupcommit): under load the
    per-transaction cost (queries, commit, outbox row, relay round) is shared between them."""
    group: GroupCommit[tuple[UsageEvent, str | None], Result] | None = rt.state.get("ingest_group")
    if group is None:

        async def apply(items: list[tuple[UsageEvent, str | None]]) -> list[Result]:
            async with rt.pool.acquire() as conn, conn.transaction():
                results = await ingest(
                    conn, [e for e, _ in items], [tp for _, tp in items], rt.state["directory"]
                )
            rt.relay.wake()
            return results

        group = rt.state["ingest_group"] = GroupCommit("usage-http", apply)
    return group


class PriceOut(BaseModel):
    service: str
    unit: str
    unit_price: str
    currency: str


class PriceList(BaseModel):
    items: list[PriceOut]
    next_cursor: str | None = None  # the catalog is one page


class PriceIn(BaseModel):
    unit: str = Field(min_length=1, max_length=64)
    unit_price: str = Field(description="decimal string, up to 6 decimals, >= 0")
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")


def _out(p: Price) -> PriceOut:
    return PriceOut(
        service=p.service, unit=p.unit, unit_price=format_micros(p.unit_price_micros), currency=p.currency
    )


@router.get("/prices", summary="The platform price catalog")
async def get_prices(request: Request, principal: CurrentPrincipal) -> PriceList:
    async with runtime(request).pool.acquire() as conn:
        prices = await storage.load_prices(conn)
    return PriceList(items=[_out(prices[k]) for k in sorted(prices)])


@router.put("/prices/{service}", summary="Set a service's platform price (applies to new events)")
async def put_price(
    service: PathKey, body: PriceIn, request: Request, principal: CurrentPrincipal
) -> PriceOut:
    require_role(principal, "platform_admin")
    if not SERVICE_RE.match(service):
        raise _invalid("service must match ^[a-z0-9_.-]{1,64}$")
    micros = money_field(body.unit_price, "unit_price", allow_zero=True)
    price = Price(service, body.unit, micros, body.currency)
    async with runtime(request).pool.acquire() as conn:
        await storage.upsert_price(conn, price)
    return _out(price)
