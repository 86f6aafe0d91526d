"""The notifier's public representations (API.md): request and response bodies, and how alert
settings, period usage and notifications are rendered into them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, EmailStr, Field, WithJsonSchema

from tally.errors import money_field
from tally.events import WEBHOOK_TYPES
from tally.money import amount_field, format_micros
from tally_notifier.account_usage import PeriodUsage
from tally_notifier.domain import MAX_RECIPIENTS, AlertRules, Condition

PeriodName = Literal["daily", "weekly", "biweekly", "monthly"]


class ConditionIn(BaseModel):
    threshold: str = amount_field("decimal string > 0")
    period: PeriodName


class AlertsIn(BaseModel):
    enabled: bool = True
    conditions: list[ConditionIn] = Field(default_factory=list, max_length=20)
    recipients: list[EmailStr] = Field(default_factory=list, max_length=MAX_RECIPIENTS)

    def rules(self) -> AlertRules:
        """The settings asked for (a threshold that is not an amount > 0: 422)."""
        return AlertRules(
            enabled=self.enabled,
            conditions=[
                Condition(money_field(c.threshold, f"conditions[{i}].threshold"), c.period)
                for i, c in enumerate(self.conditions)
            ],
            recipients=[str(r) for r in self.recipients],
        )


class AlertsOut(BaseModel):
    account_id: str
    enabled: bool
    conditions: list[ConditionIn]
    recipients: list[str]


class UsageOut(BaseModel):
    account_id: str
    period: PeriodName
    start: str
    currency: str
    services: dict[str, str]
    total: str


class NotificationOut(BaseModel):
    id: str
    kind: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: str
    read: bool


class NotificationPage(BaseModel):
    items: list[NotificationOut]
    next_cursor: str | None


def alerts_out(account_id: str, rules: AlertRules) -> AlertsOut:
    return AlertsOut(
        account_id=account_id,
        enabled=rules.enabled,
        recipients=rules.recipients,
        conditions=[
            ConditionIn(threshold=format_micros(c.threshold_micros), period=c.period)
            for c in rules.conditions
        ],
    )


def usage_out(u: PeriodUsage) -> UsageOut:
    return UsageOut(
        account_id=u.account_id,
        period=u.period,
        start=u.start.isoformat(),
        currency=u.currency,
        services={k: format_micros(v) for k, v in sorted(u.by_service.items())},
        total=format_micros(sum(u.by_service.values())),
    )


def notification_out(r: asyncpg.Record) -> NotificationOut:
    return NotificationOut(
        id=r["id"],
        kind=r["kind"],
        title=r["title"],
        body=r["body"],
        data=orjson.loads(r["data"]),
        created_at=r["created_at"].isoformat(),
        read=r["read_at"] is not None,
    )


# --- webhooks ------------------------------------------------------------------------------


# checked by the use case (which says what is wrong); the document lists the names
EventTypeName = Annotated[str, WithJsonSchema({"type": "string", "enum": [*WEBHOOK_TYPES, "*"]})]


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL, at most 2,000 characters, on a public address")
    event_types: list[EventTypeName] = Field(
        min_length=1, max_length=50, description='event type names (see /asyncapi.json), or ["*"]'
    )


class EndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    event_types: list[EventTypeName] | None = Field(None, min_length=1, max_length=50)
    enabled: bool | None = Field(None, description="enable again (forgets past failures) or disable")


class EndpointOut(BaseModel):
    id: str
    company_id: str
    url: str
    event_types: list[str]
    status: Literal["enabled", "disabled"]
    created_at: str
    failing_since: str | None
    disabled_at: str | None


class EndpointCreated(EndpointOut):
    secret: str = Field(description="whsec_…: verifies the signatures; shown only in this answer")


class EndpointPage(BaseModel):
    items: list[EndpointOut]
    next_cursor: str | None


class DeliveryOut(BaseModel):
    id: str
    endpoint_id: str
    event_id: str = Field(description="the webhook-id header of every attempt")
    event_type: str
    status: Literal["pending", "succeeded", "failed", "dropped"]
    attempts: int
    next_attempt_at: str | None = Field(description="set while pending")
    last_attempt_at: str | None
    response_code: int | None
    latency_ms: int | None
    last_error: str | None
    created_at: str


class DeliveryAttemptOut(BaseModel):
    attempt: int
    at: str
    response_code: int | None
    latency_ms: int
    error: str | None
    excerpt: str | None = Field(description="the first bytes of the answer, at most 512")


class DeliveryDetail(DeliveryOut):
    attempt_log: list[DeliveryAttemptOut]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def endpoint_out(r: asyncpg.Record) -> EndpointOut:
    return EndpointOut(
        id=r["id"],
        company_id=r["company_id"],
        url=r["url"],
        event_types=list(r["event_types"]),
        status=r["status"],
        created_at=r["created_at"].isoformat(),
        failing_since=_time(r["failing_since"]),
        disabled_at=_time(r["disabled_at"]),
    )


def endpoint_created(r: asyncpg.Record, secret: str) -> EndpointCreated:
    return EndpointCreated(**endpoint_out(r).model_dump(), secret=secret)


def delivery_out(r: asyncpg.Record) -> DeliveryOut:
    return DeliveryOut(
        id=r["id"],
        endpoint_id=r["endpoint_id"],
        event_id=r["event_id"],
        event_type=r["event_type"],
        status=r["status"],
        attempts=r["attempts"],
        next_attempt_at=_time(r["next_attempt_at"]) if r["status"] == "pending" else None,
        last_attempt_at=_time(r["last_attempt_at"]),
        response_code=r["response_code"],
        latency_ms=r["latency_ms"],
        last_error=r["last_error"],
        created_at=r["created_at"].isoformat(),
    )


def delivery_detail(r: asyncpg.Record, attempts: list[asyncpg.Record]) -> DeliveryDetail:
    return DeliveryDetail(
        **delivery_out(r).model_dump(),
        attempt_log=[
            DeliveryAttemptOut(
                attempt=a["attempt"],
                at=a["at"].isoformat(),
                response_code=a["response_code"],
                latency_ms=a["latency_ms"],
                error=a["error"],
                excerpt=a["excerpt"],
            )
            for a in attempts
        ],
    )
