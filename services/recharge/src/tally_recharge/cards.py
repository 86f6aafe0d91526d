"""An owner's cards (a company's or an account's): save one, list them, remove one, make one
the default. Each change is published (``payment_method.*`` on recharge.events) and checks the
owner's wallet again (``checks.cards_changed``): a new card may make the auto-recharge rule
hold (a wallet below its threshold is recharged now), a removed one may stop it.

The default card: a card saved while the owner has none (its first) becomes its default; a
card made default replaces the previous one; when the default is removed, the newest remaining
card becomes the default. Every charge tries the default first (``domain.card_order``)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from tally import events
from tally.auth import Principal
from tally.directory import CompanyDirectory
from tally.errors import ApiError, not_found
from tally.events import Topics
from tally.uow import Database, UnitOfWork, Wakeable
from tally_recharge import customers, storage, targets
from tally_recharge.charging import SOURCE
from tally_recharge.checks import cards_changed
from tally_recharge.domain import WalletTarget
from tally_recharge.gateway import PaymentMethodRejected, StripeGateway, StripeUnavailable
from tally_recharge.targets import Owner


@dataclass(frozen=True)
class Cards:
    rows: list[asyncpg.Record]  # default first, then newest first
    stripe_connected: bool | None  # account cards: the company's connection; None for a company


def stripe_unavailable() -> ApiError:
    return ApiError(
        503, "stripe_unavailable", "Stripe could not be reached; try again", headers={"Retry-After": "5"}
    )


async def attach(
    db: Database,
    gateway: StripeGateway,
    charger: Wakeable,
    directory: CompanyDirectory,
    principal: Principal,
    owner: Owner,
    payment_method: str,
) -> asyncpg.Record:
    """Save a card the owner entered (a Stripe PaymentMethod) on its customer, on the Stripe
    account its cards live on: 402 for a declined card, 422 for one Stripe does not know."""
    target = await targets.find(db, directory, principal, owner)
    async with db.reading() as conn:
        stripe_account = await targets.stripe_account(conn, target)
    try:
        customer = await customers.ensure(db, gateway, target, stripe_account, principal.email)
        card = await gateway.attach(payment_method, customer, stripe_account)
    except PaymentMethodRejected as exc:
        status = 402 if exc.code == "card_declined" else 422
        raise ApiError(status, exc.code, exc.message) from exc
    except StripeUnavailable as exc:
        raise stripe_unavailable() from exc
    async with db.unit() as uow:
        if (
            target.owner == "account"
            and await storage.connected_account(uow.conn, target.company_id) != stripe_account
        ):
            # the company connected another Stripe account (or none) meanwhile: a card on
            # the one it left cannot be charged; the caller saves it again
            raise ApiError(
                409,
                "company_stripe_changed",
                "the company's Stripe connection changed; save the card again",
            )
        # Cards of one owner are added one at a time (a lock per owner), so of cards attached
        # at once exactly one becomes the default.
        await storage.lock_owner_cards(uow.conn, target.owner, target.owner_id)
        first = not await storage.has_default(uow.conn, target.owner, target.owner_id)
        row = await storage.insert_payment_method(
            uow.conn,
            pm=card.id,
            owner=target.owner,
            owner_id=target.owner_id,
            company_id=target.company_id,
            stripe_account=stripe_account,
            customer_id=customer,
            brand=card.brand,
            last4=card.last4,
            is_default=first,
        )
        await _card_event(uow, target, card.id, "payment_method.attached")
    charger.wake()
    return row


async def list_cards(db: Database, directory: CompanyDirectory, principal: Principal, owner: Owner) -> Cards:
    target = await targets.find(db, directory, principal, owner)
    async with db.reading() as conn:
        rows = await storage.payment_methods(conn, target.owner, target.owner_id)
        connected = None
        if target.owner == "account":
            connected = (await storage.company(conn, target.company_id))[1] is not None
    return Cards(list(rows), connected)


async def detach(
    db: Database,
    gateway: StripeGateway,
    charger: Wakeable,
    directory: CompanyDirectory,
    principal: Principal,
    owner: Owner,
    pm: str,
) -> None:
    """Remove one of the owner's cards, at Stripe (one already gone there is fine) and here."""
    target = await targets.find(db, directory, principal, owner)
    async with db.reading() as conn:
        rows = await storage.payment_methods(conn, target.owner, target.owner_id)
    stripe_account = _owned(rows, pm)["stripe_account"]
    try:
        await gateway.detach(pm, stripe_account)
    except StripeUnavailable as exc:
        raise stripe_unavailable() from exc
    async with db.unit() as uow:
        removed = await storage.delete_payment_method(uow.conn, pm)
        if removed and removed["is_default"]:  # the default passes to the newest card left
            await storage.default_to_newest(uow.conn, removed["owner"], removed["owner_id"])
        await _card_event(uow, target, pm, "payment_method.detached")
    charger.wake()


async def make_default(
    db: Database,
    charger: Wakeable,
    directory: CompanyDirectory,
    principal: Principal,
    owner: Owner,
    pm: str,
) -> asyncpg.Record:
    """Make one of the owner's cards its default: a retry waiting for its time tries it now,
    and rebilling tries the owner's failed period charges again on it."""
    target = await targets.find(db, directory, principal, owner)
    async with db.unit() as uow:
        _owned(await storage.payment_methods(uow.conn, target.owner, target.owner_id), pm)
        await storage.make_default(uow.conn, pm, target.owner, target.owner_id)
        await cards_changed(uow.conn, target, bring_forward=True)
        rows = await storage.payment_methods(uow.conn, target.owner, target.owner_id)
        # rebilling tries the owner's failed period charges again on the new default card
        uow.emit(
            Topics.RECHARGE_EVENTS,
            target.company_id,
            events.envelope(
                "payment_method.defaulted",
                events.PaymentMethodChanged(
                    company_id=target.company_id,
                    account_id=target.account_id,
                    payment_method=pm,
                    has_valid_card=True,
                ),
                source=SOURCE,
            ),
        )
    charger.wake()
    return next(r for r in rows if r["id"] == pm)


def _owned(rows: list[asyncpg.Record], pm: str) -> asyncpg.Record:
    """The owner's card ``pm`` among its cards; 404 when it is not one of them."""
    for r in rows:
        if r["id"] == pm:
            return r
    raise not_found("payment method")


async def _card_event(uow: UnitOfWork, target: WalletTarget, pm: str, type_: str) -> None:
    """Publish the card change and re-evaluate the auto-recharge rule for the owner's wallet:
    a new card may make it hold (a wallet below its threshold is recharged now), a removed one
    may stop it."""
    await cards_changed(uow.conn, target, bring_forward=type_ == "payment_method.attached")
    remaining = await storage.payment_methods(uow.conn, target.owner, target.owner_id)
    uow.emit(
        Topics.RECHARGE_EVENTS,
        target.company_id,
        events.envelope(
            type_,
            events.PaymentMethodChanged(
                company_id=target.company_id,
                account_id=target.account_id,
                payment_method=pm,
                has_valid_card=bool(remaining),
            ),
            source=SOURCE,
        ),
    )
