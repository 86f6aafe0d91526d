"""An account's rebilling settings and their gating: what the company's plan and Stripe
connection allow (``domain.plan_allows``), what the account needs (a valid card), and what a
company's plan change or Stripe disconnection turns off. Every change is published in full on
``rebilling.settings`` (``publish.settings``)."""

from __future__ import annotations

import asyncpg

from tally.auth import Principal
from tally.db import Conn
from tally.errors import ApiError
from tally.uow import Database, UnitOfWork
from tally_rebilling import publish, storage
from tally_rebilling.access import account_for
from tally_rebilling.domain import InvalidMarkup, Mode, best_allowed, plan_allows, validate_markups
from tally_rebilling.schemas import RebillingOut


def checked_markups(markups: dict[str, str], known: set[str]) -> dict[str, str]:
    """``domain.validate_markups``, or a 422 ``invalid_markup`` naming the markup."""
    try:
        return validate_markups(markups, known)
    except InvalidMarkup as exc:
        raise ApiError(
            422,
            "invalid_markup",
            f"{exc.field}: {exc.message}",
            [{"field": exc.field, "message": exc.message}],
        ) from exc


def check_mode(plan: str, mode: Mode) -> None:
    if not plan_allows(plan, mode):
        need = (
            "the $497 (saas_pro) plan"
            if mode == "rebill_markup"
            else "the $297 (unlimited) or $497 (saas_pro) plan"
        )
        raise ApiError(403, "plan_upgrade_required", f"{mode} needs {need}")


async def rebilling_out(conn: Conn, a: asyncpg.Record) -> RebillingOut:
    mode, markups, version, _ = await storage.rebilling(conn, a["id"])
    return RebillingOut(
        account_id=a["id"], mode=mode, markups=markups, active=bool(a["has_valid_card"]), version=version
    )


async def show(db: Database, principal: Principal, aid: str) -> RebillingOut:
    async with db.reading() as conn:
        return await rebilling_out(conn, await account_for(conn, principal, aid))


async def change(
    uow: UnitOfWork, principal: Principal, aid: str, mode: Mode, markups: dict[str, str], known: set[str]
) -> RebillingOut:
    """Set an account's rebilling (``known``: the services a markup may name). Rebilling needs
    the plan that allows the mode, the company's Stripe connected and the account's card."""
    async with uow:
        conn = uow.conn
        # The company's lock first, as plan changes and Stripe (dis)connection take it: what
        # is checked below (plan, connection) cannot change until this write commits, so two
        # admins at once never leave markup on a starter plan or rebilling without Stripe.
        owner = await account_for(conn, principal, aid)  # another tenant: 404 whatever the body
        markups = checked_markups(markups, known) if mode == "rebill_markup" else {}
        if mode == "rebill_markup" and not markups:
            raise ApiError(
                422, "invalid_markup", 'rebill_markup needs at least one markup (a service or "default")'
            )
        c = await storage.company(conn, owner["company_id"], lock=True)
        assert c is not None
        a = await account_for(conn, principal, aid, lock=True)
        if mode != "off":
            check_mode(c["plan"], mode)
            if c["stripe_account_id"] is None:
                raise ApiError(
                    409,
                    "company_stripe_not_connected",
                    "connect the company's Stripe before rebilling accounts",
                )
            if not a["has_valid_card"]:
                raise ApiError(
                    409,
                    "account_card_required",
                    "the account needs a valid card before rebilling can be enabled",
                )
        await storage.save_rebilling(conn, aid, mode, markups)
        await publish.settings(uow, aid)
        return await rebilling_out(conn, a)


async def follow_company(uow: UnitOfWork, cid: str, plan: str, connected: bool) -> list[dict[str, str]]:
    """In the company's transaction (its row locked): turn off (or down) what the company's plan
    or Stripe connection no longer allows. Returns ``{account_id, from, to}`` per account changed."""
    conn = uow.conn
    changed = []
    for a in await storage.company_accounts(conn, cid):
        mode, markups, *_ = await storage.rebilling(conn, a["id"])
        new: Mode = best_allowed(plan, mode) if connected else "off"  # type: ignore[arg-type]
        if new != mode:
            await storage.save_rebilling(conn, a["id"], new, markups if new == "rebill_markup" else {})
            await publish.settings(uow, a["id"])
            changed.append({"account_id": a["id"], "from": mode, "to": new})
    return changed


async def republish_company(uow: UnitOfWork, cid: str) -> None:
    """In the company's transaction: a new version of every account's settings that has any
    (``active``/``company_stripe_connected`` follow the company), published in full."""
    conn = uow.conn
    for a in await storage.company_accounts(conn, cid):
        if (await storage.rebilling(conn, a["id"])).version:
            await storage.bump_rebilling(conn, a["id"])
            await publish.settings(uow, a["id"])
