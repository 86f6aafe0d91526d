"""wallet HTTP API: wallets, settings, ledger lines, credits, credit requests, service status.
Routes parse, authorise, call one use case and render (``schemas``).

No ``from __future__ import annotations`` here: the wallet routes' path parameter is named by
the factory (``Path(alias=param)``), which FastAPI must see as an object, not as a string."""

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from tally import idempotency
from tally.auth import CurrentPrincipal, Role, require_company, require_role
from tally.errors import JsonResponse
from tally.idempotency import IdempotencyKey, Stored
from tally.ids import ID_PATTERN, PathId, PathKey
from tally.openapi import answers
from tally.pagination import Cursor
from tally_wallet import credit_requests, credits, wallets
from tally_wallet.schemas import (
    CreditIn,
    CreditOut,
    CreditRequestOut,
    CreditRequestPage,
    ServiceStatusOut,
    TransactionPage,
    WalletOut,
    WalletPatch,
    credit_request_out,
    transaction_out,
    wallet_out,
)
from tally_wallet.wallet_settings import SettingsPatch
from tally_wallet.wallets import Target
from tally_wallet.wiring import Wired

router = APIRouter(prefix="/v1", tags=["wallet"])

Limit = Annotated[int, Query(ge=1, le=500)]


# --- wallets: one set of routes, mounted for company wallets and for account wallets ----------


def _wallet_routes(owner: Literal["company", "account"]) -> APIRouter:
    # the path keeps its own name (``{cid}`` or ``{aid}``) and each route its own name: the
    # OpenAPI document shows concrete paths and the operation ids it always had
    param = "cid" if owner == "company" else "aid"
    r = APIRouter(prefix=f"/companies/{{{param}}}" if owner == "company" else f"/accounts/{{{param}}}")
    Oid = Annotated[str, Path(alias=param, pattern=ID_PATTERN)]
    # who may change settings (the spec lets account owners change their own) and grant credits
    patchers: tuple[Role, ...] = ("company_admin", "platform_admin")
    granters: tuple[Role, ...] = ("company_admin", "platform_admin")
    if owner == "account":
        patchers += ("account_user",)
    else:
        granters = ("platform_admin",)

    @r.get("/wallet", response_model=WalletOut, name=f"{owner}_wallet")
    async def show_wallet(oid: Oid, principal: CurrentPrincipal, w: Wired) -> WalletOut:
        return wallet_out(await wallets.show(w.db, w.directory, principal, Target(owner, oid)))

    @r.patch(
        "/wallet",
        response_model=WalletOut,
        name=f"patch_{owner}_wallet",
        description="Company admins, and (as the spec lets account owners) the account's own users."
        if owner == "account"
        else None,
    )
    async def patch_wallet(oid: Oid, body: WalletPatch, principal: CurrentPrincipal, w: Wired) -> WalletOut:
        require_role(principal, *patchers)
        view = await wallets.update_settings(
            w.db, w.directory, principal, Target(owner, oid), SettingsPatch(**body.model_dump())
        )
        return wallet_out(view)

    @r.get("/wallet/transactions", response_model=TransactionPage, name=f"{owner}_transactions")
    async def list_transactions(
        oid: Oid, principal: CurrentPrincipal, w: Wired, limit: Limit = 50, cursor: Cursor = None
    ) -> TransactionPage:
        page = await wallets.transactions(
            w.db, w.directory, principal, Target(owner, oid), limit=limit, cursor=cursor
        )
        return TransactionPage(items=[transaction_out(r) for r in page.items], next_cursor=page.next_cursor)

    @r.post(
        "/wallet/credits",
        status_code=201,
        response_model=CreditOut,
        name=f"credit_{owner}",
        summary="Grant credits to a company (agency) wallet (platform admins)"
        if owner == "company"
        else "Add credits to an account wallet now (the company's AI credits button)",
    )
    async def grant_credits(
        oid: Oid,
        body: CreditIn,
        request: Request,
        principal: CurrentPrincipal,
        w: Wired,
        idempotency_key: IdempotencyKey = None,
    ) -> CreditOut | JsonResponse:
        require_role(principal, *granters)
        out = await credits.grant(
            w.db,
            w.directory,
            principal,
            Target(owner, oid),
            amount=body.amount,
            reference=body.reference,
            idempotency_key=idempotency_key,
            fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
        )
        return out.replay() if isinstance(out, Stored) else out

    return r


router.include_router(_wallet_routes("company"))
router.include_router(_wallet_routes("account"))


@router.get("/accounts/{aid}/service-status", response_model=ServiceStatusOut)
async def account_service_status(aid: PathId, principal: CurrentPrincipal, w: Wired) -> ServiceStatusOut:
    reason = await wallets.account_service_status(w.db, w.directory, principal, aid)
    return ServiceStatusOut(allowed=reason == "ok", reason=reason)


# --- credit requests -----------------------------------------------------------------------


@router.post(
    "/accounts/{aid}/credit-requests",
    status_code=201,
    response_model=CreditRequestOut,
    summary="Request credits from the company (when it has not connected Stripe)",
    responses=answers(409),
)
async def request_credits(
    aid: PathId,
    body: CreditIn,
    request: Request,
    principal: CurrentPrincipal,
    w: Wired,
    idempotency_key: IdempotencyKey = None,
) -> CreditRequestOut | JsonResponse:
    require_role(principal, "account_user")
    out = await credit_requests.request_credits(
        w.db,
        w.directory,
        principal,
        aid,
        amount=body.amount,
        reference=body.reference,
        idempotency_key=idempotency_key,
        fingerprint=idempotency.request_hash(request.url.path, body.model_dump()),
    )
    return out.replay() if isinstance(out, Stored) else out


@router.get("/companies/{cid}/credit-requests", response_model=CreditRequestPage)
async def list_credit_requests(
    cid: PathId,
    principal: CurrentPrincipal,
    w: Wired,
    status: credit_requests.Status | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> CreditRequestPage:
    require_role(principal, "company_admin", "platform_admin")
    require_company(principal, cid)
    page = await credit_requests.list_requests(w.db, cid, status, limit=limit, cursor=cursor)
    return CreditRequestPage(items=[credit_request_out(r) for r in page.items], next_cursor=page.next_cursor)


@router.post("/credit-requests/{rid}/approve", response_model=CreditRequestOut, responses=answers(409))
async def approve(rid: PathKey, principal: CurrentPrincipal, w: Wired) -> CreditRequestOut:
    require_role(principal, "company_admin", "platform_admin")
    return credit_request_out(await credit_requests.resolve(w.uow(), principal, rid, "approved"))


@router.post("/credit-requests/{rid}/reject", response_model=CreditRequestOut, responses=answers(409))
async def reject(rid: PathKey, principal: CurrentPrincipal, w: Wired) -> CreditRequestOut:
    require_role(principal, "company_admin", "platform_admin")
    return credit_request_out(await credit_requests.resolve(w.uow(), principal, rid, "rejected"))
