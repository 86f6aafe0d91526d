"""wallet HTTP API: wallets, settings, ledger lines, credits, credit requests, service status."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import asyncpg
import httpx
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from tally import events, idempotency, outbox, pagination
from tally.auth import CurrentPrincipal, Principal, require_company, require_role
from tally.db import Conn
from tally.directory import CompanyDirectory
from tally.errors import ApiError, JsonResponse, money_field, not_found
from tally.idempotency import IdempotencyKey
from tally.ids import PathId, PathKey
from tally.money import format_micros
from tally.service import runtime
from tally_wallet import storage
from tally_wallet.credits import credit
from tally_wallet.domain import (
    SYSTEM_MANUAL_CREDITS,
    Wallet,
    account_wallet_id,
    company_wallet_id,
    service_status,
)
from tally_wallet.messages import SOURCE, wallet_rows
from tally_wallet.wallet_settings import change_settings

router = APIRouter(prefix="/v1", tags=["wallet"])

Limit = Annotated[int, Query(ge=1, le=500)]


class WalletOut(BaseModel):
    wallet_id: str
    owner: str
    company_id: str | None
    account_id: str | None
    balance: str
    currency: str
    threshold: str
    reload_amount: str
    auto_recharge: bool
    smart_adjustment: bool
    status: Literal["active", "suspended"]
    funding: Literal["top_up", "request_credits"]
    rebilling: Literal["off", "rebill", "rebill_markup"] | None = Field(
        None,
        description="account wallets: the rebilling mode the wallet applies (from "
        "rebilling.settings); null for company wallets",
    )
    markups: dict[str, str] | None = Field(
        None,
        description="account wallets under rebill_markup: the markups the wallet applies, "
        'per service or "default"; null otherwise',
    )


class WalletPatch(BaseModel):
    threshold: str | None = Field(None, description="decimal string >= 0")
    reload_amount: str | None = Field(None, description="decimal string > 0")
    auto_recharge: bool | None = None
    smart_adjustment: bool | None = None


class TransactionOut(BaseModel):
    id: str
    kind: str
    amount: str
    balance_after: str
    service: str | None
    usage_event_id: str | None
    reference: str | None
    created_at: str


class TransactionPage(BaseModel):
    items: list[TransactionOut]
    next_cursor: str | None


class CreditIn(BaseModel):
    amount: str = Field(description="decimal string > 0, at most 6 decimals")
    reference: str | None = Field(None, max_length=200)


class CreditOut(BaseModel):
    transfer_id: str
    amount: str
    created: bool
    wallet: WalletOut


class CreditRequestOut(BaseModel):
    id: str
    account_id: str
    company_id: str
    amount: str
    currency: str
    reference: str | None
    status: Literal["pending", "approved", "rejected"]
    requested_by: str | None
    resolved_by: str | None
    created_at: str
    resolved_at: str | None


class CreditRequestPage(BaseModel):
    items: list[CreditRequestOut]
    next_cursor: str | None


class ServiceStatusOut(BaseModel):
    allowed: bool
    reason: Literal["ok", "account_wallet_empty", "agency_wallet_empty", "no_license"]


# --- helpers -------------------------------------------------------------------------------


async def _out(conn: Conn, w: Wallet) -> WalletOut:
    connected = False
    if w.company_id:
        _, connected = await storage.company_funding(conn, w.company_id)
    mode = None
    markups = None
    if w.kind == "account" and w.account_id:
        settings = (await storage.load_rebilling(conn, [w.account_id])).get(w.account_id)
        mode = settings.mode if settings and settings.active else "off"
        if settings and mode == "rebill_markup":
            markups = {k: format(v.normalize(), "f") for k, v in settings.markups.items()}
    return WalletOut(
        wallet_id=w.id,
        owner=w.kind,
        company_id=w.company_id,
        account_id=w.account_id,
        balance=format_micros(w.balance),
        currency=w.currency,
        threshold=format_micros(w.threshold),
        reload_amount=format_micros(w.reload_amount),
        auto_recharge=w.auto_recharge,
        smart_adjustment=w.smart_adjustment,
        status="suspended" if w.status == "suspended" else "active",
        funding="top_up" if connected else "request_credits",
        rebilling=mode,
        markups=markups,
    )


def _for(principal: Principal, out: WalletOut) -> WalletOut:
    """Markups are the company's business (rebilling settings are company_admin only): its
    account's own users see the mode, not the markups."""
    if principal.role == "account_user":
        out.markups = None
    return out


async def _currency(conn: Conn, directory: CompanyDirectory, company_id: str) -> str:
    """The company's currency, for a wallet about to be created: as rebilling.events told us,
    else as rebilling answers now (a company created a moment ago: a PATCH or a credit right
    after creation must not create its wallet in another currency), else USD."""
    r = await storage.company_currency(conn, company_id)
    if r is not None:
        return r
    try:
        return (await directory.currencies([company_id])).get(company_id, "USD")
    except httpx.HTTPError as exc:
        raise ApiError(
            503,
            "rebilling_unavailable",
            "the company's currency cannot be looked up right now; try again",
            headers={"Retry-After": "2"},
        ) from exc


async def _company_wallet(conn: Conn, request: Request, principal: Principal, cid: PathId) -> Wallet:
    require_company(principal, cid, "wallet")
    w = await storage.get_wallet(conn, company_wallet_id(cid))
    if w:
        return w
    currency = await _currency(conn, runtime(request).state["directory"], cid)
    return Wallet(company_wallet_id(cid), "company", currency, company_id=cid)


async def _account_wallet(conn: Conn, request: Request, principal: Principal, aid: PathId) -> Wallet:
    """The account's wallet (a default one if it never moved); 404 for other tenants."""
    info = await storage.account_info(conn, aid)
    company = info.company_id
    if company is None and principal.role == "account_user" and principal.account_id == aid:
        company = principal.company_id  # the token vouches for its own account
    if not principal.can_see_account(company, aid):
        raise not_found("wallet")
    w = await storage.get_wallet(conn, account_wallet_id(aid))
    if w:
        return w
    currency = await _currency(conn, runtime(request).state["directory"], company) if company else "USD"
    return Wallet(account_wallet_id(aid), "account", currency, company_id=company, account_id=aid)


def _tx(r: dict[str, Any]) -> TransactionOut:
    return TransactionOut(
        id=str(r["id"]),
        kind=r["kind"],
        amount=format_micros(r["amount"]),
        balance_after=format_micros(r["balance_after"]),
        service=r["service"],
        usage_event_id=r["usage_event_id"],
        reference=r["reference"],
        created_at=r["created_at"].isoformat(),
    )


async def _transactions(conn: Conn, wallet_id: str, limit: int, cursor: str | None) -> TransactionPage:
    rows = await storage.list_transfers(conn, wallet_id, limit=limit + 1, before_id=pagination.decode(cursor))
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["id"] if len(rows) > limit else None)
    return TransactionPage(items=[_tx(r) for r in items], next_cursor=nxt)


async def _patch(conn: Conn, w: Wallet, body: WalletPatch) -> Wallet:
    changes: dict[str, Any] = {}
    if body.threshold is not None:
        changes["threshold"] = money_field(body.threshold, "threshold", allow_zero=True)
    if body.reload_amount is not None:
        changes["reload_amount"] = money_field(body.reload_amount, "reload_amount")
    if body.auto_recharge is not None:
        changes["auto_recharge"] = body.auto_recharge
    if body.smart_adjustment is not None:
        changes["smart_adjustment"] = body.smart_adjustment
    return await change_settings(conn, w, changes, cause=f"patch:{uuid.uuid4()}")


# --- wallets -------------------------------------------------------------------------------


@router.get("/companies/{cid}/wallet", response_model=WalletOut)
async def company_wallet(cid: PathId, request: Request, principal: CurrentPrincipal) -> WalletOut:
    async with runtime(request).pool.acquire() as conn:
        return await _out(conn, await _company_wallet(conn, request, principal, cid))


@router.patch("/companies/{cid}/wallet", response_model=WalletOut)
async def patch_company_wallet(
    cid: PathId, body: WalletPatch, request: Request, principal: CurrentPrincipal
) -> WalletOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        w = await _company_wallet(conn, request, principal, cid)
        out = await _out(conn, await _patch(conn, w, body))
    rt.relay.wake()
    return out


@router.get("/companies/{cid}/wallet/transactions", response_model=TransactionPage)
async def company_transactions(
    cid: PathId, request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> TransactionPage:
    async with runtime(request).pool.acquire() as conn:
        w = await _company_wallet(conn, request, principal, cid)
        return await _transactions(conn, w.id, limit, cursor)


@router.get("/accounts/{aid}/wallet", response_model=WalletOut)
async def account_wallet(aid: PathId, request: Request, principal: CurrentPrincipal) -> WalletOut:
    async with runtime(request).pool.acquire() as conn:
        return _for(principal, await _out(conn, await _account_wallet(conn, request, principal, aid)))


@router.patch("/accounts/{aid}/wallet", response_model=WalletOut)
async def patch_account_wallet(
    aid: PathId, body: WalletPatch, request: Request, principal: CurrentPrincipal
) -> WalletOut:
    """Company admins, and (as the spec lets account owners) the account's own users."""
    require_role(principal, "company_admin", "account_user", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        w = await _account_wallet(conn, request, principal, aid)
        if w.company_id is None:
            raise not_found("wallet")
        out = await _out(conn, await _patch(conn, w, body))
    rt.relay.wake()
    return _for(principal, out)


@router.get("/accounts/{aid}/wallet/transactions", response_model=TransactionPage)
async def account_transactions(
    aid: PathId, request: Request, principal: CurrentPrincipal, limit: Limit = 50, cursor: str | None = None
) -> TransactionPage:
    async with runtime(request).pool.acquire() as conn:
        w = await _account_wallet(conn, request, principal, aid)
        return await _transactions(conn, w.id, limit, cursor)


@router.get("/accounts/{aid}/service-status", response_model=ServiceStatusOut)
async def account_service_status(
    aid: PathId, request: Request, principal: CurrentPrincipal
) -> ServiceStatusOut:
    async with runtime(request).pool.acquire() as conn:
        info = await storage.account_info(conn, aid)
        if principal.role != "product":
            await _account_wallet(conn, request, principal, aid)  # 404 for other tenants
        account = await storage.get_wallet(conn, account_wallet_id(aid))
        company = (
            await storage.get_wallet(conn, company_wallet_id(info.company_id)) if info.company_id else None
        )
    reason = service_status(account, company, info.licenses)
    return ServiceStatusOut(allowed=reason == "ok", reason=reason)


# --- credits -------------------------------------------------------------------------------


async def _credit(
    conn: Conn, principal: Principal, wallet: Wallet, body: CreditIn, idempotency_key: str | None, route: str
) -> CreditOut | JsonResponse:
    """A manual credit. With an Idempotency-Key the transfer is keyed by it (one credit per key
    and wallet whoever sends it) and the first response is answered again."""
    amount = money_field(body.amount, "amount")
    who = idempotency.principal_key(principal)
    # The transfer is keyed by the principal and its key: another principal's key never
    # swallows this credit, and the same principal's key never credits twice, even after the
    # 24 hours in which the first response is answered again.
    key = f"manual:{wallet.id}:{uuid.uuid4()}"
    if idempotency_key is not None:
        stored = await idempotency.begin(
            conn, who, idempotency_key, idempotency.request_hash(route, body.model_dump())
        )
        if stored is not None and stored.response is not None:
            return JsonResponse(stored.response, status_code=stored.status_code or 201)
        key = f"manual:{wallet.id}:{idempotency.principal_digest(who)}:{idempotency_key}"
    posted, current = await credit(
        conn,
        wallet,
        amount=amount,
        kind="manual_credit",
        key=key,
        system=SYSTEM_MANUAL_CREDITS,
        reference=body.reference,
    )
    out = CreditOut(
        transfer_id=key,
        amount=format_micros(amount),
        created=posted is not None,
        wallet=await _out(conn, current),
    )
    if idempotency_key is not None:
        await idempotency.finish(conn, who, idempotency_key, 201, out.model_dump(mode="json"))
    return out


@router.post(
    "/accounts/{aid}/wallet/credits",
    status_code=201,
    response_model=CreditOut,
    summary="Add credits to an account wallet now (the company's AI credits button)",
)
async def credit_account(
    aid: PathId,
    body: CreditIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> CreditOut | JsonResponse:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        wallet = await _account_wallet(conn, request, principal, aid)
        if wallet.company_id is None:
            raise not_found("account")  # never heard of it: its company is not known yet
        out = await _credit(conn, principal, wallet, body, idempotency_key, request.url.path)
    rt.relay.wake()
    return out


@router.post(
    "/companies/{cid}/wallet/credits",
    status_code=201,
    response_model=CreditOut,
    summary="Grant credits to a company (agency) wallet (platform admins)",
)
async def credit_company(
    cid: PathId,
    body: CreditIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> CreditOut | JsonResponse:
    require_role(principal, "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        wallet = await _company_wallet(conn, request, principal, cid)
        out = await _credit(conn, principal, wallet, body, idempotency_key, request.url.path)
    rt.relay.wake()
    return out


# --- credit requests -----------------------------------------------------------------------


def _cr(r: asyncpg.Record) -> CreditRequestOut:
    return CreditRequestOut(
        id=r["id"],
        account_id=r["account_id"],
        company_id=r["company_id"],
        amount=format_micros(r["amount"]),
        currency=r["currency"],
        reference=r["reference"],
        status=r["status"],
        requested_by=r["requested_by"],
        resolved_by=r["resolved_by"],
        created_at=r["created_at"].isoformat(),
        resolved_at=r["resolved_at"].isoformat() if r["resolved_at"] else None,
    )


@router.post(
    "/accounts/{aid}/credit-requests",
    status_code=201,
    response_model=CreditRequestOut,
    summary="Request credits from the company (when it has not connected Stripe)",
)
async def request_credits(
    aid: PathId,
    body: CreditIn,
    request: Request,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> CreditRequestOut | JsonResponse:
    require_role(principal, "account_user")
    amount = money_field(body.amount, "amount")
    rt = runtime(request)
    who = idempotency.principal_key(principal)
    async with rt.pool.acquire() as conn, conn.transaction():
        if idempotency_key is not None:
            stored = await idempotency.begin(
                conn, who, idempotency_key, idempotency.request_hash(request.url.path, body.model_dump())
            )
            if stored is not None and stored.response is not None:
                return JsonResponse(stored.response, status_code=stored.status_code or 201)
        wallet = await _account_wallet(conn, request, principal, aid)
        company_id = wallet.company_id
        assert company_id is not None  # an account user's token names its company
        _, connected = await storage.company_funding(conn, company_id)
        if connected:
            raise ApiError(
                409,
                "top_up_available",
                "the company has connected Stripe: "
                "top up the wallet with a card instead of requesting credits",
            )
        row = await storage.insert_credit_request(
            conn,
            id_=f"cr_{uuid.uuid4().hex}",
            account_id=aid,
            company_id=company_id,
            amount=amount,
            currency=wallet.currency,
            reference=body.reference,
            requested_by=principal.email or principal.sub,
        )
        if row is None:
            raise ApiError(409, "pending_request_exists", "this account already has a pending credit request")
        created = events.CreditRequestCreated(
            request_id=row["id"],
            company_id=company_id,
            account_id=aid,
            amount_micros=amount,
            currency=wallet.currency,
            reference=body.reference,
            requested_by=row["requested_by"],
        )
        await outbox.enqueue(
            conn,
            wallet_rows(
                company_id,
                events.envelope(
                    "credit_request.created", created, source=SOURCE, id_=f"credit_request:{row['id']}"
                ),
            ),
        )
        out = _cr(row)
        if idempotency_key is not None:
            await idempotency.finish(conn, who, idempotency_key, 201, out.model_dump(mode="json"))
    rt.relay.wake()
    return out


@router.get("/companies/{cid}/credit-requests", response_model=CreditRequestPage)
async def list_credit_requests(
    cid: PathId,
    request: Request,
    principal: CurrentPrincipal,
    status: Literal["pending", "approved", "rejected"] | None = None,
    limit: Limit = 50,
    cursor: str | None = None,
) -> CreditRequestPage:
    require_role(principal, "company_admin", "platform_admin")
    require_company(principal, cid)
    async with runtime(request).pool.acquire() as conn:
        rows = await storage.list_credit_requests(
            conn, cid, status, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["seq"] if len(rows) > limit else None)
    return CreditRequestPage(items=[_cr(r) for r in items], next_cursor=nxt)


async def _resolve(
    request: Request, principal: Principal, rid: PathKey, status: Literal["approved", "rejected"]
) -> CreditRequestOut:
    require_role(principal, "company_admin", "platform_admin")
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        row = await storage.get_credit_request(conn, rid, lock=True)
        if row is None or not principal.can_see_company(row["company_id"]):
            raise not_found("credit request")
        if row["status"] != "pending":
            raise ApiError(409, "request_not_pending", f"this request is already {row['status']}")
        by = principal.email or principal.sub
        row = await storage.resolve_credit_request(conn, rid, status, by)
        if status == "approved":
            wallet = Wallet(
                account_wallet_id(row["account_id"]),
                "account",
                row["currency"],
                company_id=row["company_id"],
                account_id=row["account_id"],
            )
            await credit(
                conn,
                wallet,
                amount=row["amount"],
                kind="credit_request",
                key=f"credit_request:{rid}",
                system=SYSTEM_MANUAL_CREDITS,
                reference=row["reference"],
            )
        resolved = events.CreditRequestResolved(
            request_id=rid,
            company_id=row["company_id"],
            account_id=row["account_id"],
            status=status,
            amount_micros=row["amount"],
            currency=row["currency"],
            resolved_by=by,
        )
        await outbox.enqueue(
            conn,
            wallet_rows(
                row["company_id"],
                events.envelope(
                    "credit_request.resolved", resolved, source=SOURCE, id_=f"credit_request:{rid}:{status}"
                ),
            ),
        )
    rt.relay.wake()
    return _cr(row)


@router.post("/credit-requests/{rid}/approve", response_model=CreditRequestOut)
async def approve(rid: PathKey, request: Request, principal: CurrentPrincipal) -> CreditRequestOut:
    return await _resolve(request, principal, rid, "approved")


@router.post("/credit-requests/{rid}/reject", response_model=CreditRequestOut)
async def reject(rid: PathKey, request: Request, principal: CurrentPrincipal) -> CreditRequestOut:
    return await _resolve(request, principal, rid, "rejected")
