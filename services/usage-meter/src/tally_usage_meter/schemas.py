"""usage-meter's public representations (API.md): the usage body (one event or a batch) and
its OpenAPI description, the price catalog's bodies, and how prices are rendered."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import msgspec
import orjson
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from tally.errors import ApiError, money_field
from tally.events import FAST_REFUSALS, IncomingUsage, UsageEvent, usable
from tally.money import amount_field, format_micros
from tally_usage_meter.domain import Price

MAX_BATCH = 1000
SERVICE_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")

USAGE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        # one event: any object without "events" (with it, the body is a batch)
                        {
                            **UsageEvent.model_json_schema(ref_template="#/components/schemas/{model}"),
                            "not": {"required": ["events"]},
                        },
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
_EVENT = TypeAdapter(UsageEvent)


def _finite(quantity: Any) -> bool:
    return type(quantity) is not float or math.isfinite(quantity)


class _IncomingBatch(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    events: Annotated[list[IncomingUsage], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


_FAST_BATCH = msgspec.json.Decoder(_IncomingBatch)
_FAST_EVENT = msgspec.json.Decoder(IncomingUsage)


def parse_usage_body(raw: bytes) -> list[IncomingUsage]:
    """One event or ``{"events": [...]}`` (1-1000). Anything malformed: 422, nothing taken.

    msgspec takes the common body, plain JSON with valid events (no escapes: a key may be
    spelled ``"\\u0065vents"``); everything else goes the pydantic way (``_validated``),
    which says what is wrong. Both read a valid body the same (a unit test holds them)."""
    if b"\\" not in raw:
        try:
            events = _FAST_BATCH.decode(raw).events if b'"events"' in raw else [_FAST_EVENT.decode(raw)]
        except FAST_REFUSALS:
            pass
        else:
            if usable(events):
                return events
    return [IncomingUsage.of(e) for e in _validated(raw)]


def _validated(raw: bytes) -> list[UsageEvent]:
    """``parse_usage_body`` the pydantic way: the events, or a 422 that says what is wrong."""
    # The common cases, one valid event or a valid batch, in one pass from bytes. Which one is
    # told by the key "events"; a body with escapes (a key may be spelled "\u0065vents") and
    # numbers JSON does not have (NaN, Infinity, out of a double's range, which pydantic's
    # parser takes) go the detailed path, which reads them exactly as the contract says.
    if b"\\" not in raw:
        try:
            if b'"events"' in raw:
                events = _BATCH.validate_json(raw).events
            else:
                events = [_EVENT.validate_json(raw)]
            if all(_finite(e.quantity) for e in events):
                return events
        except ValidationError:
            pass  # something wrong (or an event naming "events" in a field): the detailed path
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
    unit_price: str = amount_field("decimal string, up to 6 decimals, >= 0", allow_zero=True)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")

    def price(self, service: str) -> Price:
        """The price of ``service`` asked for (a bad service name or amount: 422)."""
        if not SERVICE_RE.match(service):
            raise _invalid("service must match ^[a-z0-9_.-]{1,64}$")
        micros = money_field(self.unit_price, "unit_price", allow_zero=True)
        return Price(service, self.unit, micros, self.currency)


def price_out(p: Price) -> PriceOut:
    return PriceOut(
        service=p.service, unit=p.unit, unit_price=format_micros(p.unit_price_micros), currency=p.currency
    )
