"""Usage aggregation and alert decisions, in the consumer's transaction.

Each ``wallet.usage`` total adds an account's usage (the account leg when rebilled, else the
company's cost of that account's usage) to its day in the company's time zone. Then every
touched account with enabled rules is checked; when a condition is exceeded and no usage alert
went out for that account today, one email is queued (owner, company owner, extra recipients)
and the company gets an in-app notification. The send log's primary key (account, kind, day)
is what makes it at most one per account per day, across redeliveries and restarts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime

import orjson

from tally.db import Conn
from tally.events import (
    UsageAlertTriggered,
    UsageCorrection,
    UsageCorrectionRecord,
    UsageTotal,
    UsageTotalRecord,
)
from tally_notifier import storage, webhook_events
from tally_notifier.domain import (
    PERIODS,
    Condition,
    Period,
    exceeded,
    local_day,
    minute_day,
    period_start,
    usage_alert,
)

# usage as posted, and what re-ratings changed of it (signed)
Counted = UsageTotal | UsageTotalRecord | UsageCorrection | UsageCorrectionRecord


async def add_usage(conn: Conn, totals: Sequence[Counted]) -> set[str]:
    """Sum usage totals (and corrections) into usage_daily; returns the accounts touched."""
    zones = await storage.timezones(conn, list({t.company_id for t in totals}))
    sums: dict[tuple[str, str, date, str, str], int] = defaultdict(int)
    for t in totals:
        day = minute_day(t.minute, zones.get(t.company_id, "UTC"))
        sums[(t.account_id, t.company_id, day, t.service, t.currency)] += t.amount_micros
    # In key order: concurrent replicas then lock shared rows in the same order (no deadlock).
    await storage.add_usage(
        conn, [(*k, max(min(v, storage.BIGINT_MAX), -storage.BIGINT_MAX)) for k, v in sorted(sums.items())]
    )
    return {t.account_id for t in totals}


async def period_usage(
    conn: Conn, aid: str, period: Period, timezone: str, now: datetime | None = None
) -> tuple[date, dict[str, int], str]:
    today = local_day(now or datetime.now(UTC), timezone)
    start = period_start(today, period)
    by_service, currency = await storage.usage_since(conn, aid, start, today)
    return start, by_service, currency


async def check_alerts(conn: Conn, accounts: set[str]) -> int:
    """Queue today's usage alert for each account whose rules are exceeded. Returns how many."""
    queued = 0
    for rule in await storage.rules_for(conn, sorted(accounts)):
        aid = rule["account_id"]
        info = await storage.account(conn, aid)
        timezone = info["timezone"] if info else "UTC"
        conditions = [
            Condition(int(c["threshold_micros"]), c["period"]) for c in orjson.loads(rule["conditions"])
        ]
        if not conditions:
            continue
        totals: dict[Period, int] = {}
        services: dict[Period, dict[str, int]] = {}
        currency = "USD"
        for period in {c.period for c in conditions}:
            _, by_service, currency = await period_usage(conn, aid, period, timezone)
            totals[period] = sum(by_service.values())
            services[period] = by_service
        hits = exceeded(conditions, totals)
        if not hits:
            continue
        today = local_day(datetime.now(UTC), timezone)
        if not await storage.mark_sent(conn, aid, "usage_alert", today):
            continue  # one per account per day
        hits.sort(key=lambda c: PERIODS.index(c.period))
        mail = usage_alert(aid, currency, hits, totals, services[hits[0].period])
        recipients = [
            e
            for e in (info["owner_email"] if info else None, info["company_owner_email"] if info else None)
            if e
        ]
        recipients += orjson.loads(rule["recipients"])
        if recipients:
            await storage.queue_email(
                conn, f"usage_alert:{aid}:{today}", recipients, mail.subject, mail.text, mail.html
            )
        await storage.notify(
            conn,
            f"usage_alert:{aid}:{today}",
            rule["company_id"],
            "usage_alert",
            mail.subject,
            mail.text.split("\n")[0],
            {"account_id": aid, "day": today.isoformat()},
        )
        first = hits[0]
        await webhook_events.emit(
            conn,
            "usage_alert.triggered",
            UsageAlertTriggered(
                company_id=rule["company_id"],
                account_id=aid,
                day=today.isoformat(),
                currency=currency,
                periods=[c.period for c in hits],
                threshold_micros=first.threshold_micros,
                usage_micros=totals[first.period],
            ),
            id_=f"usage_alert:{aid}:{today}",
        )
        queued += 1
    return queued
