"""The wallet's public representations (API.md): request and response bodies, and how
wallets, ledger lines and credit requests are rendered into them."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from tally.money import amount_field, format_micros
from tally_wallet.wallets import WalletView


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
    """Strict: only these fields, booleans as booleans, and no field set to null (an omitted
    field is unchanged; a null would change nothing, so it is refused rather than ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # ``SkipJsonSchema[None]``: omitted is allowed, null is not (the validator below), so the
    # document shows no null either
    threshold: str | SkipJsonSchema[None] = amount_field("decimal string >= 0", allow_zero=True, default=None)
    reload_amount: str | SkipJsonSchema[None] = amount_field("decimal string > 0", default=None)
    auto_recharge: bool | SkipJsonSchema[None] = None
    smart_adjustment: bool | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _no_nulls(self) -> WalletPatch:
        nulls = sorted(f for f in self.model_fields_set if getattr(self, f) is None)
        if nulls:
            raise ValueError(f"{nulls[0]} may not be null (leave it out to keep it)")
        return self


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
    amount: str = amount_field("decimal string > 0, at most 6 decimals")
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


def wallet_out(v: WalletView) -> WalletOut:
    w = v.wallet
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
        funding="top_up" if v.stripe_connected else "request_credits",
        rebilling=v.rebilling,
        markups=v.markups,
    )


def transaction_out(r: dict[str, Any] | asyncpg.Record) -> TransactionOut:
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


def credit_request_out(r: asyncpg.Record) -> CreditRequestOut:
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
