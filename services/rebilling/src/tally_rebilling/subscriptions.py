"""Subscribing an account to a catalog product, listing and cancelling its subscriptions: the
use cases behind ``/v1/accounts/{aid}/subscriptions`` and ``DELETE /v1/subscriptions/{sid}``.
The period billing itself (legs, dunning) is ``billing``."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg

from tally import idempotency
from tally.auth import Principal
from tally.db import Conn
from tally.errors import ApiError, not_found
from tally.idempotency import Stored
from tally.uow import Database, UnitOfWork
from tally_rebilling import storage
from tally_rebilling.access import account_for
from tally_rebilling.billing import Biller
from tally_rebilling.domain import CATALOG, Product, current_period
from tally_rebilling.schemas import SubscriptionOut, subscription_out


def _charge_of(legs: list[asyncpg.Record]) -> str:
    statuses = {leg["status"] for leg in legs}
    if statuses == {"charged"}:
        return "charged"
    return "failed" if "failed" in statuses else "pending"


async def subscribe(
    db: Database,
    biller: Biller,
    principal: Principal,
    aid: str,
    product: str,
    deployment: str,
    *,
    idempotency_key: str | None,
    fingerprint: str,
    at: datetime | None = None,
) -> SubscriptionOut | Stored:
    """Subscribe ``aid`` to ``product`` and charge the current period at once (each leg; a
    failed leg leaves the subscription past_due, dunned). With an Idempotency-Key the same
    request subscribes once and answers the first response again (``Stored``)."""
    at = at or datetime.now(UTC)
    who = idempotency.principal_key(principal)
    period = current_period(at)
    in_flight = False
    async with db.unit() as uow:
        # the tenant check first: another tenant's account is a 404 whatever the body or key
        await account_for(uow.conn, principal, aid)
        if principal.role == "account_user" and deployment == "direct":
            raise ApiError(403, "forbidden", "direct deployment is the company's decision")
        p = CATALOG.get(product)
        if p is None:
            raise ApiError(
                422,
                "unknown_product",
                f"no product {product!r} in the catalog",
                [{"field": "product", "message": f"one of {sorted(CATALOG)}"}],
            )
        sub_id = f"sub_{uuid.uuid4().hex[:20]}"
        if idempotency_key is not None:
            key = await uow.claim_resource(who, idempotency_key, fingerprint, sub_id)
            if key.replayed is not None:
                return key.replayed
            sub_id = key.resource
            # not the key's first request: the first is charging that subscription now
            in_flight = not key.first and await storage.subscription(uow.conn, sub_id) is not None
        if not in_flight:
            await _create(uow.conn, principal, aid, p, deployment, sub_id, period, at)
    if in_flight:  # outside the transaction: it holds the key's lock the first one needs
        assert idempotency_key is not None
        first = await _first_response(db, who, idempotency_key, fingerprint)
        if first is not None:
            return first
        async with db.reading() as conn:
            sub = await storage.subscription(conn, sub_id)
            assert sub is not None
            dunning = await storage.outstanding(conn, sub_id, len(biller.delays))
            return subscription_out(sub, dunning, period=period, charge="pending")
    await biller.charge_due(at, subscription_id=sub_id, wait=True)
    async with db.unit() as uow:
        conn = uow.conn
        settled = await storage.subscription(conn, sub_id)
        assert settled is not None
        out = subscription_out(
            settled,
            await storage.outstanding(conn, sub_id, len(biller.delays)),
            period=period,
            charge=_charge_of(await storage.subscription_legs(conn, sub_id, period)),
        )
        if idempotency_key is not None:
            # the key was claimed in the first transaction: its answer is recorded here
            uow.remember(201, out.model_dump(mode="json"), key=(who, idempotency_key))
    return out


async def _create(
    conn: Conn,
    principal: Principal,
    aid: str,
    p: Product,
    deployment: str,
    sub_id: str,
    period: str,
    at: datetime,
) -> None:
    """In the caller's transaction: the subscription and its first period's legs."""
    a = await storage.account(conn, aid)
    if a is None or not principal.can_see_account(a["company_id"], aid):
        raise not_found("account")
    c = await storage.company(conn, a["company_id"], lock=True)
    assert c is not None
    if deployment == "resell" and c["stripe_account_id"] is None:
        raise ApiError(
            409, "company_stripe_not_connected", "reselling charges the account through the company's Stripe"
        )
    price = (await storage.company_prices(conn, c["id"])).get(p.id, p.platform_price_micros)
    sub = await storage.insert_subscription(
        conn,
        {
            "id": sub_id,
            "account_id": aid,
            "company_id": c["id"],
            "product": p.id,
            "deployment": deployment,
            "platform_price": p.platform_price_micros,
            "company_price": price,
            "first_period": period,
        },
    )
    await storage.open_legs(conn, sub, period, at)


async def _first_response(
    db: Database, who: str, key: str, fingerprint: str, timeout: float = 60
) -> Stored | None:
    """The same key's first request is still charging: its response once it has one (the
    same status and body), or None after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        async with db.unit() as uow:
            stored = await uow.claim_key(who, key, fingerprint)
        if stored is not None and stored.response is not None:
            return stored
    return None


async def list_for_account(
    db: Database, principal: Principal, aid: str, *, limit: int, cursor: str | None, tries: int
) -> storage.Page:
    """An account's subscriptions, each with what is still owed (``tries``: the dunning
    schedule's length; a leg past its last try is not tried again)."""
    async with db.reading() as conn:
        await account_for(conn, principal, aid)
        rows = await storage.account_subscriptions(conn, aid, limit=limit + 1, after=cursor, tries=tries)
    return storage.page(rows, limit)


async def cancel(uow: UnitOfWork, principal: Principal, sid: str, tries: int) -> SubscriptionOut:
    """Cancel at the end of the paid period: nothing more is charged, the service runs until
    the period ends (the runner ends it when the next period opens). Cancelling twice is the
    same as once."""
    async with uow:
        conn = uow.conn
        sub = await storage.subscription(conn, sid, lock=True)
        if sub is None or not (
            principal.can_see_account(sub["company_id"], sub["account_id"])
            if sub["account_id"]
            else principal.can_see_company(sub["company_id"])
        ):
            raise not_found("subscription")
        if sub["kind"] != "product":
            # a pool's licenses are freed from the pool, seats go with their members: their
            # billing follows what is held, it is not cancelled on its own
            raise ApiError(
                409,
                "not_cancellable",
                f"{sub['kind']} are billed for what the "
                "company holds; free licenses or remove members instead",
            )
        if sub["status"] != "cancelled" and not sub["cancel_at_period_end"]:
            await storage.cancel_at_period_end(conn, sid)
            sub = await storage.subscription(conn, sid)
            assert sub is not None
        return subscription_out(sub, await storage.outstanding(conn, sid, tries))
