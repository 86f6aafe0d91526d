"""A company's license pool: buying licenses into it, assigning them to workspaces and giving
them back.

Buying is the use case behind ``POST /v1/companies/{cid}/licenses``. Licenses are a platform
product billed monthly: a purchase charges the company's card ``quantity x unit_price`` for the
current period at once and the pool grows only when that charge succeeds (402
``payment_failed`` otherwise, the pool unchanged); from the next period the pool's total is one
recurring charge (a ``licenses`` subscription, dunned by ``billing``). A purchase whose payment
is still processing stays pending and is settled by the runner, so a charge that succeeds later
still grows the pool."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tally import idempotency
from tally.auth import Principal
from tally.errors import ApiError, not_found
from tally.money import format_micros, to_micros
from tally.uow import Database, UnitOfWork
from tally_rebilling import publish, storage
from tally_rebilling.access import account_for, company_for
from tally_rebilling.domain import current_period, next_period
from tally_rebilling.schemas import BoughtOut, PurchaseOut, pool_out

if TYPE_CHECKING:
    from tally_rebilling.billing import Biller


def unit_price(configured: str) -> int:
    """The platform's monthly price per license (``Settings.license_price``, a decimal string)."""
    return to_micros(configured, field="TALLY_LICENSE_PRICE")


@dataclass(frozen=True)
class Bought:
    status_code: int  # 201 bought, 202 payment processing, 402 payment failed
    body: dict[str, Any]


@dataclass(frozen=True)
class Held:
    """A workspace's licenses after a change, and its company's pool."""

    assigned: int
    total: int
    pool_assigned: int


async def buy(
    db: Database,
    biller: Biller,
    principal: Principal,
    cid: str,
    quantity: int,
    *,
    idempotency_key: str | None,
    fingerprint: str,
) -> Bought:
    """Three transactions: the purchase (pending), its charge (``settle``), the answer. With an
    Idempotency-Key the same request buys once; its answer is recorded once the charge ended."""
    who = idempotency.principal_key(principal)
    price = biller.license_price
    period = current_period()
    async with db.unit() as uow:
        conn = uow.conn
        pid = f"lp_{uuid.uuid4().hex[:20]}"
        # the tenant check first: another company is a 404 whatever the key
        c = await storage.company(conn, cid)
        if c is None or not principal.can_see_company(cid):
            raise not_found("company")
        if idempotency_key is not None:
            key = await uow.claim_resource(who, idempotency_key, fingerprint, pid)
            if key.replayed is not None:
                return Bought(key.replayed.status_code or 201, key.replayed.response)
            pid = key.resource  # a second request for the key settles the same purchase
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
    status = await settle(db.unit(), biller, pid)
    async with db.unit() as uow:
        conn = uow.conn
        bought = await storage.purchase(conn, pid)
        assert bought is not None
        total, assigned = await storage.pool(conn, cid)
        purchase = PurchaseOut(
            id=pid,
            quantity=bought["quantity"],
            amount=format_micros(bought["amount"]),
            status=bought["status"],
        )
        if bought["status"] == "failed":
            out = Bought(
                402,
                {
                    "error": {
                        "code": "payment_failed",
                        "message": (
                            f"the company's card was not charged ({bought['error']}); the pool is unchanged"
                        ),
                        "details": [purchase.model_dump(mode="json")],
                    }
                },
            )
        else:
            body = BoughtOut(**pool_out(total, assigned, price).model_dump(), purchase=purchase)
            out = Bought(201 if bought["status"] == "charged" else 202, body.model_dump(mode="json"))
        if idempotency_key is not None and status != "pending":
            # the key was claimed in the first transaction: its answer is recorded here
            uow.remember(out.status_code, out.body, key=(who, idempotency_key))
    return out


async def settle(uow: UnitOfWork, biller: Biller, pid: str, *, wait: bool = True) -> str:
    """Charge (or ask again how the charge ended) one pending purchase and apply it: the pool
    grows, and so does its monthly charge, only when the card was charged."""
    async with uow:
        conn = uow.conn
        p = await storage.lock_purchase(conn, pid, wait=wait)
        if p is None:
            return "settled"
        outcome, why, _ = await biller.charge_card(
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
            conn, cid, p["quantity"], biller.license_price, next_period(current_period(now))
        )
        await storage.settle_purchase(conn, pid, "charged", None)
        await publish.license_changed(uow, cid, None)
    return "charged"


async def settle_pending(biller: Biller, company_id: str | None = None) -> None:
    """The runner: purchases whose payment was processing are settled once it ends."""
    async with biller.db.reading() as conn:
        pending = await storage.pending_purchases(conn, company_id)
    for pid in pending:
        await settle(biller.db.unit(), biller, pid, wait=False)


async def show_pool(db: Database, principal: Principal, cid: str) -> tuple[int, int]:
    """(total, assigned) of the company's pool."""
    async with db.reading() as conn:  # storage.pool makes the empty pool on first sight
        await company_for(conn, principal, cid)
        return await storage.pool(conn, cid)


async def assign(uow: UnitOfWork, principal: Principal, aid: str, quantity: int) -> Held:
    """Assign ``quantity`` licenses of the company's pool to the workspace."""
    async with uow:
        conn = uow.conn
        a = await account_for(conn, principal, aid, lock=True)
        cid = a["company_id"]
        total, assigned = await storage.pool(conn, cid, lock=True)
        if total - assigned < quantity:
            raise ApiError(
                409,
                "no_license_available",
                f"the pool has {total - assigned} available, {quantity} asked",
            )
        held = await storage.change_assigned(conn, aid, cid, quantity)
        await publish.license_changed(uow, cid, aid)
        return Held(held, *await storage.pool(conn, cid))


async def free(uow: UnitOfWork, principal: Principal, aid: str, quantity: int) -> Held:
    """Give licenses back to the pool (never below the workspace's billable members)."""
    async with uow:
        conn = uow.conn
        a = await account_for(conn, principal, aid, lock=True)
        held = await storage.account_assigned(conn, aid)
        seated = len(await storage.members(conn, aid)) if a["billing_model"] == "self_billing" else 0
        if held - quantity < max(seated, 0):
            raise ApiError(409, "licenses_in_use", f"the workspace holds {held} and {seated} seats are taken")
        held = await storage.change_assigned(conn, aid, a["company_id"], -quantity)
        await publish.license_changed(uow, a["company_id"], aid)
        return Held(held, *await storage.pool(conn, a["company_id"]))
