"""wallet HTTP API: wallets and their ledger lines (this slice: read side)."""

from __future__ import annotations

import base64
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from tally.auth import CurrentPrincipal, Principal, require_company, require_role
from tally.errors import ApiError, not_found
from tally.money import MoneyError, format_micros, to_micros
from tally.service import runtime

from tally_wallet import storage
from tally_wallet.credits import credit
from tally_wallet.domain import (
    SYSTEM_MANUAL_CREDITS,
    Wallet,
    account_wallet_id,
    company_wallet_id,
)

router = APIRouter(prefix="/v1", tags=["wallet"])


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
    status: str
    funding: str


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


def _out(w: Wallet) -> WalletOut:
    return WalletOut(
        wallet_id=w.id, owner=w.kind, company_id=w.company_id, account_id=w.account_id,
        balance=format_micros(w.balance), currency=w.currency,
        threshold=format_micros(w.threshold), reload_amount=format_micros(w.reload_amount),
        auto_recharge=w.auto_recharge, smart_adjustment=w.smart_adjustment, status=w.status,
        funding="request_credits")


async def _company_wallet(request: Request, principal: Principal, cid: str) -> Wallet:
    require_company(principal, cid, "wallet")
    async with runtime(request).pool.acquire() as conn:
        w = await storage.get_wallet(conn, company_wallet_id(cid))
    return w or Wallet(company_wallet_id(cid), "company", "USD", company_id=cid)


async def _account_wallet(request: Request, principal: Principal, aid: str) -> Wallet:
    async with runtime(request).pool.acquire() as conn:
        w = await storage.get_wallet(conn, account_wallet_id(aid))
    company = w.company_id if w else None
    if not principal.can_see_account(company, aid):
        raise not_found("wallet")
    return w or Wallet(account_wallet_id(aid), "account", "USD", company_id=company,
                       account_id=aid)


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode()


def _decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        return int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except ValueError as exc:
        raise ApiError(422, "validation_error", "cursor is not valid") from exc


async def _transactions(request: Request, wallet_id: str, limit: int,
                        cursor: str | None) -> TransactionPage:
    before = _decode_cursor(cursor)
    async with runtime(request).pool.acquire() as conn:
        rows = await storage.list_transfers(conn, wallet_id, limit=limit + 1, before_id=before)
    page, more = rows[:limit], len(rows) > limit
    return TransactionPage(
        items=[_tx(r) for r in page],
        next_cursor=_encode_cursor(page[-1]["id"]) if more and page else None)


def _tx(r: dict[str, Any]) -> TransactionOut:
    return TransactionOut(
        id=str(r["id"]), kind=r["kind"], amount=format_micros(r["amount"]),
        balance_after=format_micros(r["balance_after"]), service=r["service"],
        usage_event_id=r["usage_event_id"], reference=r["reference"],
        created_at=r["created_at"].isoformat())


Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("/companies/{cid}/wallet", response_model=WalletOut)
async def company_wallet(cid: str, request: Request, principal: CurrentPrincipal) -> WalletOut:
    return _out(await _company_wallet(request, principal, cid))


@router.get("/companies/{cid}/wallet/transactions", response_model=TransactionPage)
async def company_transactions(cid: str, request: Request, principal: CurrentPrincipal,
                               limit: Limit = 50, cursor: str | None = None) -> TransactionPage:
    w = await _company_wallet(request, principal, cid)
    return await _transactions(request, w.id, limit, cursor)


@router.get("/accounts/{aid}/wallet", response_model=WalletOut)
async def account_wallet(aid: str, request: Request, principal: CurrentPrincipal) -> WalletOut:
    return _out(await _account_wallet(request, principal, aid))


@router.get("/accounts/{aid}/wallet/transactions", response_model=TransactionPage)
async def account_transactions(aid: str, request: Request, principal: CurrentPrincipal,
                               limit: Limit = 50, cursor: str | None = None) -> TransactionPage:
    w = await _account_wallet(request, principal, aid)
    return await _transactions(request, w.id, limit, cursor)


class CreditIn(BaseModel):
    amount: str = Field(description="decimal string > 0, at most 6 decimals")
    reference: str | None = Field(None, max_length=200)


class CreditOut(BaseModel):
    transfer_id: str
    amount: str
    created: bool
    wallet: WalletOut


def _amount(text: str) -> int:
    try:
        micros = to_micros(text)
    except MoneyError as exc:
        raise ApiError(422, "validation_error", str(exc),
                       [{"field": "amount", "message": str(exc)}]) from exc
    if micros <= 0:
        raise ApiError(422, "validation_error", "amount must be greater than 0",
                       [{"field": "amount", "message": "must be greater than 0"}])
    return micros


async def _credit(request: Request, wallet: Wallet, body: CreditIn,
                  idempotency_key: str | None) -> CreditOut:
    amount = _amount(body.amount)
    key = f"manual:{wallet.id}:{idempotency_key or uuid.uuid4()}"
    rt = runtime(request)
    async with rt.pool.acquire() as conn, conn.transaction():
        posted, current = await credit(conn, wallet, amount=amount, kind="manual_credit",
                                       key=key, system=SYSTEM_MANUAL_CREDITS,
                                       reference=body.reference)
    rt.relay.wake()
    return CreditOut(transfer_id=key, amount=format_micros(amount), created=posted is not None,
                     wallet=_out(current))


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


@router.post("/accounts/{aid}/wallet/credits", status_code=201, response_model=CreditOut,
             summary="Add credits to an account wallet now (the company's AI credits button)")
async def credit_account(aid: str, body: CreditIn, request: Request,
                         principal: CurrentPrincipal,
                         idempotency_key: IdempotencyKey = None) -> CreditOut:
    require_role(principal, "company_admin", "platform_admin")
    wallet = await _account_wallet(request, principal, aid)
    if wallet.company_id is None:
        if principal.company_id is None:
            raise not_found("wallet")
        wallet.company_id = principal.company_id
    return await _credit(request, wallet, body, idempotency_key)


@router.post("/companies/{cid}/wallet/credits", status_code=201, response_model=CreditOut,
             summary="Grant credits to a company (agency) wallet (platform admins)")
async def credit_company(cid: str, body: CreditIn, request: Request,
                         principal: CurrentPrincipal,
                         idempotency_key: IdempotencyKey = None) -> CreditOut:
    require_role(principal, "platform_admin")
    wallet = await _company_wallet(request, principal, cid)
    return await _credit(request, wallet, body, idempotency_key)
