"""recharge HTTP API: payment methods, top-ups, recharge history, Stripe webhooks."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import asyncpg
import stripe
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from tally import events, idempotency, inbox, outbox, pagination
from tally.auth import CurrentPrincipal, Principal, require_company, require_role
from tally.db import Conn
from tally.errors import ApiError, JsonResponse, money_field, not_found
from tally.events import Topics
from tally.idempotency import IdempotencyKey
from tally.ids import PathId, PathKey
from tally.money import format_micros
from tally.service import Runtime, runtime
from tally_recharge import storage
from tally_recharge.charging import SOURCE, Recharger, WalletTarget
from tally_recharge.gateway import PaymentMethodRejected, StripeGateway, StripeUnavailable

router = APIRouter(prefix="/v1", tags=["recharge"])
Limit = Annotated[int, Query(ge=1, le=500)]


class AttachIn(BaseModel):
    payment_method: str = Field(pattern=r"^pm_[A-Za-z0-9_]{1,200}$")


class PaymentMethodOut(BaseModel):
    id: str
    brand: str | None
    last4: str | None
    is_default: bool


class PaymentMethodList(BaseModel):
    items: list[PaymentMethodOut]
    next_cursor: str | None = None
    stripe_connected: bool | None = Field(
        None,
        description="account cards: whether the company's Stripe is connected as recharge "
        "knows it (its cards are charged only then); null for company cards",
    )


class TopUpIn(BaseModel):
    amount: str = Field(description="decimal string > 0, at most 6 decimals")


class TryOut(BaseModel):
    payment_method: str
    outcome: Literal["calling", "processing", "succeeded", "failed"]
    decline_code: str | None = None


class AttemptOut(BaseModel):
    id: str
    wallet_id: str
    trigger: Literal["auto", "manual"]
    amount: str
    currency: str
    status: Literal["pending", "succeeded", "failed", "cancelled"] = Field(
        description="cancelled: an automatic recharge the auto-recharge rule dropped before "
        "any card was charged (auto-recharge turned off, balance restored, no card)"
    )
    tries: list[TryOut]
    payment_intent: str | None
    fee: str | None
    error: str | None
    created_at: str


class AttemptPage(BaseModel):
    items: list[AttemptOut]
    next_cursor: str | None


def _rt(request: Request) -> tuple[Runtime, StripeGateway, Recharger]:
    rt = runtime(request)
    return rt, rt.state["gateway"], rt.state["recharger"]


def _attempt_out(a: storage.Attempt) -> AttemptOut:
    return AttemptOut(
        id=a.id,
        wallet_id=a.wallet_id,
        trigger=a.trigger,
        amount=format_micros(a.amount_micros),
        currency=a.currency,
        status=a.status,
        tries=[
            TryOut(
                payment_method=t["payment_method"], outcome=t["outcome"], decline_code=t.get("decline_code")
            )
            for t in a.tries
        ],
        payment_intent=a.payment_intent,
        fee=format_micros(a.fee_micros) if a.fee_micros is not None else None,
        error=a.error,
        created_at=a.created_at.isoformat(),
    )


def _pm_out(row: asyncpg.Record) -> PaymentMethodOut:
    return PaymentMethodOut(
        id=row["id"], brand=row["brand"], last4=row["last4"], is_default=row["is_default"]
    )


async def _currency(conn: Conn, request: Request, company_id: str) -> str:
    return await storage.currency_of(conn, _rt(request)[2].directory, company_id)


async def _company_target(conn: Conn, request: Request, principal: Principal, cid: PathId) -> WalletTarget:
    require_company(principal, cid)
    currency = await _currency(conn, request, cid)
    return WalletTarget(f"company:{cid}", "company", cid, None, currency)


async def _account_target(conn: Conn, request: Request, principal: Principal, aid: PathId) -> WalletTarget:
    company = await storage.account_company(conn, aid)
    if company is None and principal.role == "account_user" and principal.account_id == aid:
        company = principal.company_id
    if company is None or not principal.can_see_account(company, aid):
        raise not_found("account")
    currency = await _currency(conn, request, company)
    return WalletTarget(f"account:{aid}", "account", company, aid, currency)


async def _stripe_account(conn: Conn, target: WalletTarget) -> str | None:
    """None for company wallets (platform Stripe); the company's connected account for
    account wallets, or 409 when the company has not connected Stripe."""
    if target.owner == "company":
        return None
    _, acct = await storage.company(conn, target.company_id)
    if not acct:
        raise ApiError(
            409,
            "company_stripe_not_connected",
            "the company has not connected Stripe: this account uses credit requests",
        )
    return acct


async def _ensure_customer(
    conn: Conn, gateway: StripeGateway, target: WalletTarget, stripe_account: str | None, email: str | None
) -> str:
    existing = await storage.customer(conn, target.owner, target.owner_id, stripe_account)
    if existing:
        return existing
    created = await gateway.create_customer(
        email=email,
        name=f"{target.owner}:{target.owner_id}",
        stripe_account=stripe_account,
        idempotency_key=f"customer:{target.owner}:{target.owner_id}:{stripe_account or ''}",
    )
    return await storage.save_customer(
        conn, target.owner, target.owner_id, target.company_id, stripe_account, created
    )


def _unavailable(exc: StripeUnavailable) -> ApiError:
    return ApiError(
        503, "stripe_unavailable", "Stripe could not be reached; try again", headers={"Retry-After": "5"}
    )


async def _attach(
    request: Request, principal: Principal, target: WalletTarget, body: AttachIn
) -> PaymentMethodOut:
    rt, gateway, _ = _rt(request)
    async with rt.pool.acquire() as conn:
        stripe_account = await _stripe_account(conn, target)
        try:
            customer = await _ensure_customer(conn, gateway, target, stripe_account, principal.email)
            card = await gateway.attach(body.payment_method, customer, stripe_account)
        except PaymentMethodRejected as exc:
            status = 402 if exc.code == "card_declined" else 422
            raise ApiError(status, exc.code, exc.message) from exc
        except StripeUnavailable as exc:
            raise _unavailable(exc) from exc
        async with conn.transaction():
            if (
                target.owner == "account"
                and await storage.connected_account(conn, target.company_id) != stripe_account
            ):
                # the company connected another Stripe account (or none) meanwhile: a card on
                # the one it left cannot be charged; the caller saves it again
                raise ApiError(
                    409,
                    "company_stripe_changed",
                    "the company's Stripe connection changed; save the card again",
                )
            row = await storage.add_payment_method(
                conn,
                pm=card.id,
                owner=target.owner,
                owner_id=target.owner_id,
                company_id=target.company_id,
                stripe_account=stripe_account,
                customer_id=customer,
                brand=card.brand,
                last4=card.last4,
            )
            await _card_event(conn, target, card.id, "payment_method.attached")
    rt.relay.wake()
    _rt(request)[2].wake()
    return _pm_out(row)


async def _card_event(conn: Conn, target: WalletTarget, pm: PathKey, type_: str) -> None:
    """Publish the card change and re-evaluate the auto-recharge rule for the owner's wallet:
    a new card may make it hold (a wallet below its threshold is recharged now), a removed one
    may stop it."""
    await _cards_changed(conn, target, bring_forward=type_ == "payment_method.attached")
    remaining = await storage.payment_methods(conn, target.owner, target.owner_id)
    await outbox.publish(
        conn,
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


async def _cards_changed(conn: Conn, target: WalletTarget, *, bring_forward: bool) -> None:
    # Lock order, as the charger's: the wallet's check row first, then its attempts.
    await storage.queue_check(conn, target.owner, target.company_id, target.account_id)
    if bring_forward:  # a retry waiting for its time tries the new card now
        await storage.bring_forward(conn, target.wallet_id)


async def _list(request: Request, target: WalletTarget) -> PaymentMethodList:
    async with runtime(request).pool.acquire() as conn:
        rows = await storage.payment_methods(conn, target.owner, target.owner_id)
        connected = None
        if target.owner == "account":
            connected = (await storage.company(conn, target.company_id))[1] is not None
    return PaymentMethodList(items=[_pm_out(r) for r in rows], stripe_connected=connected)


async def _owned(conn: Conn, target: WalletTarget, pm: PathKey) -> None:
    rows = await storage.payment_methods(conn, target.owner, target.owner_id)
    if not any(r["id"] == pm for r in rows):
        raise not_found("payment method")


async def _detach(request: Request, target: WalletTarget, pm: PathKey) -> Response:
    rt, gateway, _ = _rt(request)
    async with rt.pool.acquire() as conn:
        await _owned(conn, target, pm)
        rows = await storage.payment_methods(conn, target.owner, target.owner_id)
        stripe_account = next(r["stripe_account"] for r in rows if r["id"] == pm)
        try:
            await gateway.detach(pm, stripe_account)
        except StripeUnavailable as exc:
            raise _unavailable(exc) from exc
        async with conn.transaction():
            await storage.remove_payment_method(conn, pm)
            await _card_event(conn, target, pm, "payment_method.detached")
    rt.relay.wake()
    _rt(request)[2].wake()
    return Response(status_code=204)


async def _default(request: Request, target: WalletTarget, pm: PathKey) -> PaymentMethodOut:
    rt, _, recharger = _rt(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        await _owned(conn, target, pm)
        await storage.make_default(conn, pm, target.owner, target.owner_id)
        await _cards_changed(conn, target, bring_forward=True)
        rows = await storage.payment_methods(conn, target.owner, target.owner_id)
        # rebilling tries the owner's failed period charges again on the new default card
        await outbox.publish(
            conn,
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
    rt.relay.wake()
    recharger.wake()
    return _pm_out(next(r for r in rows if r["id"] == pm))


async def _chargeable(conn: Conn, target: WalletTarget) -> str | None:
    """The Stripe account a top-up of ``target`` charges through; 409 when it cannot be."""
    stripe_account = await _stripe_account(conn, target)
    if not await storage.payment_methods(conn, target.owner, target.owner_id):
        raise ApiError(409, "no_payment_method", "add a card before topping up")
    return stripe_account


async def _top_up(
    request: Request, principal: Principal, target: WalletTarget, body: TopUpIn, idempotency_key: str | None
) -> AttemptOut | JsonResponse:
    """A manual top-up. With an Idempotency-Key the attempt's id comes from the key: a second
    request finds the same attempt (and never charges again); once the first has answered,
    its response is answered again."""
    amount = money_field(body.amount, "amount")
    rt, _, recharger = _rt(request)
    who = idempotency.principal_key(principal)
    attempt_id = token = None
    async with rt.pool.acquire() as conn:
        if idempotency_key is None:
            stripe_account = await _chargeable(conn, target)
        else:
            async with conn.transaction():
                # a key already used answers as it did (or 422), whatever changed since; a
                # refusal below rolls the key back with the rest
                key = await idempotency.claim(
                    conn,
                    who,
                    idempotency_key,
                    idempotency.request_hash(request.url.path, body.model_dump()),
                    f"rc_{uuid.uuid4().hex}",
                )
                if key.replayed is not None:
                    return JsonResponse(key.replayed.response, status_code=key.replayed.status_code or 201)
                attempt_id = key.resource
                existing = None if key.first else await storage.get_attempt(conn, attempt_id)
                # the key's attempt, still pending, is answered as it stands whatever changed
                # since (its card removed, Stripe disconnected): no new check refuses it
                stripe_account = (
                    existing.stripe_account if existing is not None else await _chargeable(conn, target)
                )
                if existing is None:
                    # the attempt is created with the key (so a crash between the two cannot
                    # leave a key whose request never charged, nor a charge without its key),
                    # leased to this request, which runs it now
                    token = recharger.token()
                    await storage.insert_attempt(
                        conn,
                        {
                            "id": attempt_id,
                            **target.ref(),
                            "trigger": "manual",
                            "amount_micros": amount,
                            "stripe_account": stripe_account,
                            "lease_token": token,
                            "lease_seconds": recharger.lease_seconds,
                        },
                    )
    attempt = await recharger.top_up(target, amount, stripe_account, attempt_id, token)
    if idempotency_key is not None and token is None:
        # the same key's first request is charging it now: answer what it answers
        attempt = await recharger.settled(attempt.id, timeout=30)
    out = _attempt_out(attempt)
    if idempotency_key is not None and attempt.status != "pending":
        async with rt.pool.acquire() as conn, conn.transaction():
            await idempotency.finish(conn, who, idempotency_key, 201, out.model_dump(mode="json"))
    return out


async def _history(request: Request, target: WalletTarget, limit: int, cursor: str | None) -> AttemptPage:
    async with runtime(request).pool.acquire() as conn:
        rows = await storage.list_attempts(
            conn, target.wallet_id, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1].seq if len(rows) > limit else None)
    return AttemptPage(items=[_attempt_out(a) for a in items], next_cursor=nxt)


# --- routes: companies ---------------------------------------------------------------------


@router.post("/companies/{cid}/payment-methods", status_code=201, response_model=PaymentMethodOut)
async def attach_company_card(
    cid: PathId, body: AttachIn, request: Request, principal: CurrentPrincipal
) -> PaymentMethodOut:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _company_target(conn, request, principal, cid)
    return await _attach(request, principal, target, body)


@router.get("/companies/{cid}/payment-methods", response_model=PaymentMethodList)
async def list_company_cards(cid: PathId, request: Request, principal: CurrentPrincipal) -> PaymentMethodList:
    async with runtime(request).pool.acquire() as conn:
        target = await _company_target(conn, request, principal, cid)
    return await _list(request, target)


@router.delete("/companies/{cid}/payment-methods/{pm}", status_code=204)
async def detach_company_card(
    cid: PathId, pm: PathKey, request: Request, principal: CurrentPrincipal
) -> Response:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _company_target(conn, request, principal, cid)
    return await _detach(request, target, pm)


@router.post("/companies/{cid}/payment-methods/{pm}/default", response_model=PaymentMethodOut)
async def default_company_card(
    cid: PathId, pm: PathKey, request: Request, principal: CurrentPrincipal
) -> PaymentMethodOut:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _company_target(conn, request, principal, cid)
    return await _default(request, target, pm)


@router.post("/companies/{cid}/wallet/top-ups", status_code=201, response_model=AttemptOut)
async def top_up_company(
    cid: PathId,
    body: TopUpIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> AttemptOut | JsonResponse:
    require_role(principal, "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _company_target(conn, request, principal, cid)
    return await _top_up(request, principal, target, body, idempotency_key)


@router.get("/companies/{cid}/wallet/recharges", response_model=AttemptPage)
async def company_recharges(
    cid: PathId, request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> AttemptPage:
    async with runtime(request).pool.acquire() as conn:
        target = await _company_target(conn, request, principal, cid)
    return await _history(request, target, limit, cursor)


# --- routes: accounts ----------------------------------------------------------------------


@router.post("/accounts/{aid}/payment-methods", status_code=201, response_model=PaymentMethodOut)
async def attach_account_card(
    aid: PathId, body: AttachIn, request: Request, principal: CurrentPrincipal
) -> PaymentMethodOut:
    require_role(principal, "account_user", "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _account_target(conn, request, principal, aid)
    return await _attach(request, principal, target, body)


@router.get("/accounts/{aid}/payment-methods", response_model=PaymentMethodList)
async def list_account_cards(aid: PathId, request: Request, principal: CurrentPrincipal) -> PaymentMethodList:
    async with runtime(request).pool.acquire() as conn:
        target = await _account_target(conn, request, principal, aid)
    return await _list(request, target)


@router.delete("/accounts/{aid}/payment-methods/{pm}", status_code=204)
async def detach_account_card(
    aid: PathId, pm: PathKey, request: Request, principal: CurrentPrincipal
) -> Response:
    require_role(principal, "account_user", "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _account_target(conn, request, principal, aid)
    return await _detach(request, target, pm)


@router.post("/accounts/{aid}/payment-methods/{pm}/default", response_model=PaymentMethodOut)
async def default_account_card(
    aid: PathId, pm: PathKey, request: Request, principal: CurrentPrincipal
) -> PaymentMethodOut:
    require_role(principal, "account_user", "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _account_target(conn, request, principal, aid)
    return await _default(request, target, pm)


@router.post("/accounts/{aid}/wallet/top-ups", status_code=201, response_model=AttemptOut)
async def top_up_account(
    aid: PathId,
    body: TopUpIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> AttemptOut | JsonResponse:
    require_role(principal, "account_user", "company_admin", "platform_admin")
    async with runtime(request).pool.acquire() as conn:
        target = await _account_target(conn, request, principal, aid)
    return await _top_up(request, principal, target, body, idempotency_key)


@router.get("/accounts/{aid}/wallet/recharges", response_model=AttemptPage)
async def account_recharges(
    aid: PathId, request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> AttemptPage:
    async with runtime(request).pool.acquire() as conn:
        target = await _account_target(conn, request, principal, aid)
    return await _history(request, target, limit, cursor)


# --- service-to-service card charges ------------------------------------------------------


class ChargeIn(BaseModel):
    key: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,120}$", description="idempotency key")
    owner: Literal["company", "account"]
    company_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    account_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    amount: str
    description: str = Field("", max_length=200)


@router.post(
    "/charges",
    status_code=201,
    response_model=AttemptOut,
    summary="Charge a company's or account's cards for another service (at most once "
    "per key; platform services only)",
)
async def charge(body: ChargeIn, request: Request, principal: CurrentPrincipal) -> AttemptOut:
    require_role(principal, "platform_admin")
    amount = money_field(body.amount, "amount")
    rt, _, recharger = _rt(request)
    async with rt.pool.acquire() as conn:
        currency = await _currency(conn, request, body.company_id)
        if body.owner == "account":
            if not body.account_id:
                raise ApiError(422, "validation_error", "account_id is required for an account")
            target = WalletTarget(
                f"account:{body.account_id}", "account", body.company_id, body.account_id, currency
            )
        else:
            target = WalletTarget(f"company:{body.company_id}", "company", body.company_id, None, currency)
        stripe_account = await _stripe_account(conn, target)
    attempt = await recharger.charge_once(body.key, target, amount, stripe_account, body.description)
    return _attempt_out(attempt)


# --- Stripe webhooks -----------------------------------------------------------------------


@router.post("/stripe/webhooks", summary="Stripe events (signature checked)")
async def stripe_webhook(request: Request) -> dict[str, str]:
    rt, _, recharger = _rt(request)
    payload = await request.body()
    signature = request.headers.get("stripe-signature", "")
    try:
        event = stripe.Webhook.construct_event(payload, signature, rt.settings.stripe_webhook_secret)
    except (ValueError, stripe.SignatureVerificationError) as exc:
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify") from exc
    if event.type not in ("payment_intent.succeeded", "payment_intent.payment_failed"):
        return {"status": "ignored"}
    intent = event.data.object.to_dict()
    attempt_id = (intent.get("metadata") or {}).get("tally_attempt")
    async with rt.pool.acquire() as conn, conn.transaction():
        if not await inbox.claim(conn, "stripe-webhooks", [event.id]):
            return {"status": "duplicate"}
    if attempt_id:
        async with rt.pool.acquire() as conn:
            token = recharger.token()
            leased = await storage.lease_attempt(conn, attempt_id, recharger.lease_seconds, token)
        if leased is not None:  # still pending here: settle it from what Stripe says
            await recharger.run(leased, token)
    return {"status": "processed"}
