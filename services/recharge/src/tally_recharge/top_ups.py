"""A manual top-up: the owner charges its cards now for an amount it chooses, credited to its
wallet once Stripe confirms (``recharge.succeeded``; the wallet credits it)."""

from __future__ import annotations

import uuid

from tally import idempotency
from tally.auth import Principal
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.errors import ApiError, money_field
from tally.idempotency import Stored
from tally.uow import Database
from tally_recharge import storage, targets
from tally_recharge.charging import Recharger
from tally_recharge.domain import WalletTarget
from tally_recharge.schemas import AttemptOut, attempt_out
from tally_recharge.targets import Owner


async def _chargeable(conn: Conn, target: WalletTarget) -> str | None:
    """The Stripe account a top-up of ``target`` charges through; 409 when it cannot be."""
    stripe_account = await targets.stripe_account(conn, target)
    if not await storage.payment_methods(conn, target.owner, target.owner_id):
        raise ApiError(409, "no_payment_method", "add a card before topping up")
    return stripe_account


async def top_up(
    db: Database,
    recharger: Recharger,
    directory: CompanyDirectory,
    principal: Principal,
    owner: Owner,
    *,
    amount: str,
    idempotency_key: str | None,
    fingerprint: str,
) -> AttemptOut | Stored:
    """A manual top-up of ``amount`` (the request's decimal string: checked once the owner is,
    so another tenant's wallet is a 404 whatever the amount). With an Idempotency-Key the
    attempt's id comes from the key: a second request finds the same attempt (and never charges
    again); once the first has answered, its response is answered again (``Stored``)."""
    target = await targets.find(db, directory, principal, owner)
    micros = money_field(amount, "amount")
    who = idempotency.principal_key(principal)
    attempt_id = token = None
    if idempotency_key is None:
        async with db.reading() as conn:
            stripe_account = await _chargeable(conn, target)
            target = await targets.pinned(conn, directory, target)
    else:
        async with db.unit() as uow:
            # a key already used answers as it did (or 422), whatever changed since; a
            # refusal below rolls the key back with the rest
            key = await uow.claim_resource(who, idempotency_key, fingerprint, f"rc_{uuid.uuid4().hex}")
            if key.replayed is not None:
                return key.replayed
            attempt_id = key.resource
            existing = None if key.first else await storage.get_attempt(uow.conn, attempt_id)
            # the key's attempt, still pending, is answered as it stands whatever changed
            # since (its card removed, Stripe disconnected): no new check refuses it
            stripe_account = (
                existing.stripe_account if existing is not None else await _chargeable(uow.conn, target)
            )
            if existing is None:
                target = await targets.pinned(uow.conn, directory, target)
                # the attempt is created with the key (so a crash between the two cannot
                # leave a key whose request never charged, nor a charge without its key),
                # leased to this request, which runs it now
                token = recharger.token()
                await storage.insert_attempt(
                    uow.conn,
                    {
                        "id": attempt_id,
                        **target.ref(),
                        "trigger": "manual",
                        "amount_micros": micros,
                        "stripe_account": stripe_account,
                        "lease_token": token,
                        "lease_seconds": recharger.lease_seconds,
                    },
                )
    attempt = await recharger.top_up(target, micros, stripe_account, attempt_id, token)
    if idempotency_key is not None and token is None:
        # the same key's first request is charging it now: answer what it answers
        attempt = await recharger.settled(attempt.id, timeout=30)
    out = attempt_out(attempt)
    if idempotency_key is not None and attempt.status != "pending":
        # the response is known only now, after the charge: recorded for the key on its own
        async with db.unit() as uow:
            uow.remember(201, out.model_dump(mode="json"), key=(who, idempotency_key))
    return out
