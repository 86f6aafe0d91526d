"""The notifier's public representations (API.md): request and response bodies, and how alert
settings, period usage and notifications are rendered into them."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
import orjson
from pydantic import BaseModel, EmailStr, Field

from tally.errors import money_field
from tally.money import format_micros
from tally_notifier.account_usage import PeriodUsage
from tally_notifier.domain import MAX_RECIPIENTS, AlertRules, Condition

PeriodName = Literal["daily", "weekly", "biweekly", "monthly"]


class ConditionIn(BaseModel):
    threshold: str = Field(description="decimal string > 0")
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
