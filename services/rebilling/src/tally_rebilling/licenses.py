"""Buying licenses into a company's pool: the use case behind ``POST /v1/companies/{cid}/
licenses``. Licenses are a platform product billed monthly: a purchase charges the company's
card ``quantity x unit_price`` for the current period at once and the pool grows only when that
charge succeeds (402 ``payment_failed`` otherwise, the pool unchanged); from the next period the
pool's total is one recurring charge (a ``licenses`` subscription, dunned by ``billing``). A
purchase whose payment is still processing stays pending and is settled by the runner, so a
charge that succeeds later still grows the pool."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from tally import idempotency
from tally.auth import Principal
from tally.errors import ApiError, not_found
from tally.money import format_micros, to_micros
from tally_rebilling import publish, storage
from tally_rebilling.domain import current_period, next_period

if TYPE_CHECKING:
    from tally_rebilling.billing import Biller

DEFAULT_UNIT_PRICE = "10"


def unit_price() -> int:
    """The platform's monthly price per license (``TALLY_LICENSE_PRICE``, a decimal string)."""
    return to_micros(os.environ.get("TALLY_LICENSE_PRICE", DEFAULT_UNIT_PRICE), field="TALLY_LICENSE_PRICE")


def pool_view(total: int, assigned: int) -> dict[str, Any]:
    return {
        "total": total,
        "assigned": assigned,
        "available": total - assigned,
        "unit_price": format_micros(unit_price()),
    }


@dataclass(frozen=True)
class Bought:
    status_code: int  # 201 bought, 202 payment processing, 402 payment failed
    body: dict[str, Any]


async def buy(
    pool: asyncpg.Pool,
    biller: Biller,
    principal: Principal,
    cid: str,
    quantity: int,
    *,
    idempotency_key: str | None,
    fingerprint: str,
) -> Bought:
    who = idempotency.principal_key(principal)
    price = unit_price()
    period = current_period()
    async with pool.acquire() as conn, conn.transaction():
        pid = f"lp_{uuid.uuid4().hex[:20]}"
        if idempotency_key is not None:
            key = await idempotency.claim(conn, who, idempotency_key, fingerprint, pid)
            if key.replayed is not None:
                return Bought(key.replayed.status_code or 201, key.replayed.response)
            pid = key.resource  # a second request for the key settles the same purchase
        c = await storage.company(conn, cid)
        if c is None or not principal.can_see_company(cid):
            raise not_found("company")
        sub = await storage.license_subscription(conn, cid)
        if sub is not None and sub["status"] == "past_due":
            raise ApiError(
                402,
                "payment_failed",
                "the license pool's last charge failed: update the card on file before buying more licenses",
            )
        await storage.insert_purchase(
            conn,
            {
                "id": pid,
                "company_id": cid,
                "quantity": quantity,
                "amount": quantity * price,
                "period": period,
            },
        )
    status = await settle(biller, pid)
    async with pool.acquire() as conn, conn.transaction():
        bought = await storage.purchase(conn, pid)
        assert bought is not None
        total, assigned = await storage.pool(conn, cid)
        body = {
            **pool_view(total, assigned),
            "purchase": {
                "id": pid,
                "quantity": bought["quantity"],
                "amount": format_micros(bought["amount"]),
                "status": bought["status"],
            },
        }
        if bought["status"] == "failed":
            out = Bought(
                402,
                {
                    "error": {
                        "code": "payment_failed",
                        "message": (
                            f"the company's card was not charged ({bought['error']}); the pool is unchanged"
                        ),
                        "details": [body["purchase"]],
                    }
                },
            )
        else:
            out = Bought(201 if bought["status"] == "charged" else 202, body)
        if idempotency_key is not None and status != "pending":
            await idempotency.finish(conn, who, idempotency_key, out.status_code, out.body)
    return out


async def settle(biller: Biller, pid: str, *, wait: bool = True) -> str:
    """Charge (or ask again how the charge ended) one pending purchase and apply it: the pool
    grows, and so does its monthly charge, only when the card was charged."""
    async with biller.pool.acquire() as conn, conn.transaction():
        p = await storage.lock_purchase(conn, pid, wait=wait)
        if p is None:
            return "settled"
        outcome, why = await biller.charge_card(
            key=f"licenses-{pid}",
            owner="company",
            company_id=p["company_id"],
            account_id=None,
            amount=p["amount"],
            description=f"{p['quantity']} licenses, {p['period']}",
        )
        if outcome == "pending":
            return "pending"
        if outcome == "failed":
            await storage.settle_purchase(conn, pid, "failed", why)
            return "failed"
        cid = p["company_id"]
        await storage.pool(conn, cid, lock=True)
        sub = await storage.license_subscription(conn, cid, lock=True)
        now = datetime.now(UTC)
        if sub is not None and sub["first_period"] <= current_period(now):
            # this period's charge of the pool is made with the licenses held before (the
            # purchase paid the new ones for it): opened now, if the runner has not yet
            await storage.open_legs(conn, sub, current_period(now), now)
        await storage.add_to_pool(conn, cid, p["quantity"])
        # the purchase pays for the period in which the licenses join the pool (a payment
        # that processed into the next month pays that month); the pool's charge covers them
        # from the period after
        await storage.grow_license_subscription(
            conn, cid, p["quantity"], unit_price(), next_period(current_period(now))
        )
        await storage.settle_purchase(conn, pid, "charged", None)
        await publish.license_changed(conn, cid, None)
    return "charged"


async def settle_pending(biller: Biller, company_id: str | None = None) -> None:
    """The runner: purchases whose payment was processing are settled once it ends."""
    async with biller.pool.acquire() as conn:
        pending = await storage.pending_purchases(conn, company_id)
    for pid in pending:
        await settle(biller, pid, wait=False)
