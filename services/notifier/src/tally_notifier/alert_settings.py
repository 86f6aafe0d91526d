"""An account's usage alert settings (the company sets them): conditions (a threshold per
period) and extra recipients. ``alerts`` applies them as usage comes in."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from tally.auth import Principal
from tally.uow import Database, UnitOfWork
from tally_notifier import accounts, storage
from tally_notifier.domain import AlertRules, Condition, recipients_of


async def replace(
    uow: UnitOfWork, principal: Principal, account_id: str, rules: Callable[[], AlertRules]
) -> AlertRules:
    """Replace the account's settings; returns them as kept (recipients normalised). ``rules``
    parses the request's (a 422 for a bad threshold), after the tenant check: another tenant's
    account is a 404 whatever the body."""
    async with uow:
        a = await accounts.visible(uow.conn, principal, account_id)
        asked = rules()
        kept = AlertRules(asked.enabled, asked.conditions, recipients_of(asked.recipients))
        await storage.save_rules(
            uow.conn,
            account_id,
            a["company_id"],
            kept.enabled,
            [{"threshold_micros": c.threshold_micros, "period": c.period} for c in kept.conditions],
            kept.recipients,
        )
    return kept


async def show(db: Database, principal: Principal, account_id: str) -> AlertRules:
    """The account's settings; an account never set up has none, disabled."""
    async with db.reading() as conn:
        await accounts.visible(conn, principal, account_id)
        r = await storage.rules(conn, account_id)
    if r is None:
        return AlertRules(enabled=False, conditions=[], recipients=[])
    return AlertRules(
        enabled=r["enabled"],
        conditions=[Condition(c["threshold_micros"], c["period"]) for c in orjson.loads(r["conditions"])],
        recipients=orjson.loads(r["recipients"]),
    )
