"""An account's usage in the current period (daily, weekly, bi-weekly or monthly, in its
company's time zone), by service, as the notifier has summed it from ``wallet.usage``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from tally.auth import Principal
from tally.uow import Database
from tally_notifier import accounts
from tally_notifier.alerts import period_usage
from tally_notifier.domain import Period


@dataclass(frozen=True)
class PeriodUsage:
    account_id: str
    period: Period
    start: date  # the period's first day
    currency: str
    by_service: dict[str, int]  # micros


async def in_period(db: Database, principal: Principal, account_id: str, period: Period) -> PeriodUsage:
    async with db.reading() as conn:
        a = await accounts.visible(conn, principal, account_id)
        start, by_service, currency = await period_usage(conn, account_id, period, a["timezone"])
    return PeriodUsage(account_id, period, start, currency, by_service)
