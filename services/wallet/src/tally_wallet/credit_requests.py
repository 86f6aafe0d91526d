"""The "request credits" workflow (spec: an account whose company has not connected Stripe
asks the company for credits; the company approves or rejects): request, list, resolve. An
approval credits the account wallet once; each step is published (``credit_request.*``)."""

from __future__ import annotations

import uuid
from typing import Literal

import asyncpg

from tally import events, idempotency, pagination
from tally.auth import Principal
from tally.directory import CompanyDirectory
from tally.errors import ApiError, money_field, not_found
from tally.idempotency import Stored
from tally.uow import Database, UnitOfWork
from tally_wallet import storage
from tally_wallet.credits import credit
from tally_wallet.domain import SYSTEM_MANUAL_CREDITS, BalanceOutOfRange, Wallet, account_wallet_id
from tally_wallet.messages import SOURCE, wallet_rows
from tally_wallet.schemas import CreditRequestOut, credit_request_out
from tally_wallet.wallets import Page, Target, find

Status = Literal["pending", "approved", "rejected"]


async def request_credits(
    db: Database,
    directory: CompanyDirectory,
    principal: Principal,
    account_id: str,
    *,
    amount: str,
    reference: str | None,
    idempotency_key: str | None,
    fingerprint: str,
) -> CreditRequestOut | Stored:
    """An account user asks its company for ``amount``: one pending request per account, and
    only while the company has not connected Stripe (else the account tops up itself)."""
    who = idempotency.principal_key(principal)
    # the tenant check first: another account is a 404 whatever the key or the amount
    wallet = await find(db, directory, principal, Target("account", account_id))
    async with db.unit() as uow:
        if idempotency_key is not None:
            stored = await uow.claim_key(who, idempotency_key, fingerprint)
            if stored is not None and stored.response is not None:
                return stored
        micros = money_field(amount, "amount")
        company_id = wallet.company_id
        assert company_id is not None  # an account user's token names its company
        _, connected = await storage.company_funding(uow.conn, company_id)
        if connected:
            raise ApiError(
                409,
                "top_up_available",
                "the company has connected Stripe: "
                "top up the wallet with a card instead of requesting credits",
            )
        row = await storage.insert_credit_request(
            uow.conn,
            id_=f"cr_{uuid.uuid4().hex}",
            account_id=account_id,
            company_id=company_id,
            amount=micros,
            currency=wallet.currency,
            reference=reference,
            requested_by=principal.email or principal.sub,
        )
        if row is None:
            raise ApiError(409, "pending_request_exists", "this account already has a pending credit request")
        created = events.CreditRequestCreated(
            request_id=row["id"],
            company_id=company_id,
            account_id=account_id,
            amount_micros=micros,
            currency=wallet.currency,
            reference=reference,
            requested_by=row["requested_by"],
        )
        uow.publish(
            wallet_rows(
                company_id,
                events.envelope(
                    "credit_request.created", created, source=SOURCE, id_=f"credit_request:{row['id']}"
                ),
            )
        )
        out = credit_request_out(row)
        uow.remember(201, out.model_dump(mode="json"))
        return out


async def list_requests(
    db: Database, company_id: str, status: Status | None, *, limit: int, cursor: str | None
) -> Page:
    async with db.reading() as conn:
        rows = await storage.list_credit_requests(
            conn, company_id, status, limit=limit + 1, before_seq=pagination.decode(cursor)
        )
    items, nxt = pagination.page(rows, limit, rows[limit - 1]["seq"] if len(rows) > limit else None)
    return Page(items, nxt)


async def resolve(
    uow: UnitOfWork, principal: Principal, request_id: str, status: Literal["approved", "rejected"]
) -> asyncpg.Record:
    """The company approves (the account wallet is credited) or rejects a pending request."""
    async with uow:
        row = await storage.get_credit_request(uow.conn, request_id, lock=True)
        if row is None or not principal.can_see_company(row["company_id"]):
            raise not_found("credit request")
        if row["status"] != "pending":
            raise ApiError(409, "request_not_pending", f"this request is already {row['status']}")
        by = principal.email or principal.sub
        row = await storage.resolve_credit_request(uow.conn, request_id, status, by)
        if status == "approved":
            wallet = Wallet(
                account_wallet_id(row["account_id"]),
                "account",
                row["currency"],
                company_id=row["company_id"],
                account_id=row["account_id"],
            )
            try:
                await credit(
                    uow.conn,
                    wallet,
                    amount=row["amount"],
                    kind="credit_request",
                    key=f"credit_request:{request_id}",
                    system=SYSTEM_MANUAL_CREDITS,
                    reference=row["reference"],
                )
            except BalanceOutOfRange as exc:
                raise ApiError(
                    422,
                    "validation_error",
                    "amount: the credit would take the wallet beyond what it can hold",
                ) from exc
        resolved = events.CreditRequestResolved(
            request_id=request_id,
            company_id=row["company_id"],
            account_id=row["account_id"],
            status=status,
            amount_micros=row["amount"],
            currency=row["currency"],
            resolved_by=by,
        )
        uow.publish(
            wallet_rows(
                row["company_id"],
                events.envelope(
                    "credit_request.resolved",
                    resolved,
                    source=SOURCE,
                    id_=f"credit_request:{request_id}:{status}",
                ),
            )
        )
        return row
