"""recharge HTTP API: payment methods, top-ups, recharge history, card charges for other
services, Stripe webhooks. Routes parse, authorise, call one use case and render
(``schemas``).

No ``from __future__ import annotations`` here: the owner routes' path parameter is named by
the factory (``Path(alias=param)``), which FastAPI must see as an object, not as a string."""

from typing import Annotated

import stripe
from fastapi import APIRouter, Path, Query, Request, Response

from tally import idempotency
from tally.auth import CurrentPrincipal, Role, require_role
from tally.errors import ApiError, JsonResponse, money_field
from tally.idempotency import IdempotencyKey, Stored
from tally.ids import ID_PATTERN, PathKey
from tally.openapi import answers
from tally.pagination import Cursor
from tally_recharge import cards, charges, recharges, top_ups, webhooks
from tally_recharge.schemas import (
    AttachIn,
    AttemptOut,
    AttemptPage,
    ChargeIn,
    PaymentMethodList,
    PaymentMethodOut,
    TopUpIn,
    attempt_out,
    payment_method_out,
)
from tally_recharge.targets import Owner, OwnerKind
from tally_recharge.wiring import Wired

router = APIRouter(prefix="/v1", tags=["recharge"])
Limit = Annotated[int, Query(ge=1, le=500)]


# --- cards, top-ups, history: one set of routes, mounted for companies and for accounts -------


def _owner_routes(kind: OwnerKind) -> APIRouter:
    # the path keeps its own name (``{cid}`` or ``{aid}``): the OpenAPI shows concrete paths
    param = "cid" if kind == "company" else "aid"
    r = APIRouter(prefix=f"/companies/{{{param}}}" if kind == "company" else f"/accounts/{{{param}}}")
    # who may change cards and top up (an account's own users may, for their account)
    writers: tuple[Role, ...] = ("company_admin", "platform_admin")
    if kind == "account":
        writers = ("account_user", *writers)

    @r.post(
        "/payment-methods",
        status_code=201,
        response_model=PaymentMethodOut,
        name=f"attach_{kind}_card",
        responses=answers(402, 409),
    )
    async def attach_card(
        oid: Annotated[str, Path(alias=param, pattern=ID_PATTERN)],
        body: AttachIn,
        principal: CurrentPrincipal,
        w: Wired,
    ) -> PaymentMethodOut:
        require_role(principal, *writers)
        row = await cards.attach(
            w.db, w.gateway, w.recharger, w.directory, principal, Owner(kind, oid), body.payment_method
        )
        return payment_method_out(row)

    @r.get("/payment-methods", response_model=PaymentMethodList, name=f"list_{kind}_cards")
    async def list_cards(
        oid: Annotated[str, Path(alias=param, pattern=ID_PATTERN)], principal: CurrentPrincipal, w: Wired
    ) -> PaymentMethodList:
        found = await cards.list_cards(w.db, w.directory, principal, Owner(kind, oid))
        return PaymentMethodList(
            items=[payment_method_out(r) for r in found.rows], stripe_connected=found.stripe_connected
        )

    @r.delete("/payment-methods/{pm}", status_code=204, name=f"detach_{kind}_card")
    async def detach_card(
        oid: Annotated[str, Path(alias=param, pattern=ID_PATTERN)],
        pm: PathKey,
        principal: CurrentPrincipal,
        w: Wired,
    ) -> Response:
        require_role(principal, *writers)
        await cards.detach(w.db, w.gateway, w.recharger, w.directory, principal, Owner(kind, oid), pm)
        return Response(status_code=204)

    @r.post("/payment-methods/{pm}/default", response_model=PaymentMethodOut, name=f"default_{kind}_card")
    async def default_card(
        oid: Annotated[str, Path(alias=param, pattern=ID_PATTERN)],
        pm: PathKey,
        principal: CurrentPrincipal,
        w: Wired,
    ) -> PaymentMethodOut:
        require_role(principal, *writers)
        row = await cards.make_default(w.db, w.recharger, w.directory, principal, Owner(kind, oid), pm)
        return payment_method_out(row)

    @r.post(
        "/wallet/top-ups",
        status_code=201,
        response_model=AttemptOut,
        name=f"top_up_{kind}",
        responses=answers(409),
    )
    async def top_up(
        oid: Annotated[str, Path(alias=param, pattern=ID_PATTERN)],
        body: TopUpIn,
        request: Request,
        principal: CurrentPrincipal,
        w: Wired,
        idempotency_key: IdempotencyKey = None,
    ) -> AttemptOut | JsonResponse:
        require_role(principal, *writers)
        out = await top_ups.top_up(
            w.db,
            w.recharger,
            w.directory,
            principal,
            Owner(kind, oid),
            amount=body.amount,
            idempotency_key=idempotency_key,
            fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
        )
        if isinstance(out, Stored):
            return out.replay()
        return out

    @r.get("/wallet/recharges", response_model=AttemptPage, name=f"{kind}_recharges")
    async def list_recharges(
        oid: Annotated[str, Path(alias=param, pattern=ID_PATTERN)],
        principal: CurrentPrincipal,
        w: Wired,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> AttemptPage:
        page = await recharges.history(
            w.db, w.directory, principal, Owner(kind, oid), limit=limit, cursor=cursor
        )
        return AttemptPage(items=[attempt_out(a) for a in page.items], next_cursor=page.next_cursor)

    return r


router.include_router(_owner_routes("company"))
router.include_router(_owner_routes("account"))


# --- service-to-service card charges ------------------------------------------------------


@router.post(
    "/charges",
    status_code=201,
    response_model=AttemptOut,
    summary="Charge a company's or account's cards for another service (at most once "
    "per key; platform services only)",
    responses=answers(404, 409),
)
async def charge(body: ChargeIn, principal: CurrentPrincipal, w: Wired) -> AttemptOut:
    require_role(principal, "platform_admin")
    amount = money_field(body.amount, "amount")
    attempt = await charges.charge(
        w.db,
        w.recharger,
        w.directory,
        key=body.key,
        owner=body.owner,
        company_id=body.company_id,
        account_id=body.account_id,
        amount=amount,
        description=body.description,
    )
    return attempt_out(attempt)


# --- Stripe webhooks -----------------------------------------------------------------------


@router.post(
    "/stripe/webhooks",
    summary="Stripe events (signature checked)",
    responses={
        400: {
            "description": "invalid_signature: the Stripe-Signature header does not verify; "
            "invalid_event: a payment event without an id or data.object"
        }
    },
)
async def stripe_webhook(request: Request, w: Wired) -> dict[str, str]:
    payload = await request.body()
    signature = request.headers.get("stripe-signature", "")
    try:
        event = stripe.Webhook.construct_event(payload, signature, w.settings.stripe_webhook_secret)
    except (ValueError, stripe.SignatureVerificationError) as exc:
        raise ApiError(400, "invalid_signature", "the webhook signature does not verify") from exc
    except (AttributeError, TypeError) as exc:  # signed, but JSON that is not an object
        raise ApiError(400, "invalid_event", "a Stripe event is a JSON object") from exc
    return {"status": await webhooks.receive(w.db, w.recharger, event)}
