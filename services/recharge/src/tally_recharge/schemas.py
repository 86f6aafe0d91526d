"""recharge's public representations (API.md): request and response bodies, and how cards and
recharge attempts are rendered into them."""

from __future__ import annotations

from typing import Literal

import asyncpg
from pydantic import BaseModel, Field

from tally.money import amount_field, format_micros, minor_units_to_micros
from tally_recharge.storage import Attempt


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
    amount: str = amount_field("decimal string > 0, at most 6 decimals")


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
    charged: str | None = Field(
        None,
        description="what the card was charged and the wallet credited, once succeeded: the "
        "amount rounded up to the currency's minor unit (a top-up of 1.234567 USD is 1.240000)",
    )
    tries: list[TryOut]
    payment_intent: str | None
    fee: str | None
    error: str | None
    created_at: str


class AttemptPage(BaseModel):
    items: list[AttemptOut]
    next_cursor: str | None


class ChargeIn(BaseModel):
    key: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,120}$", description="idempotency key")
    owner: Literal["company", "account"]
    company_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    account_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    amount: str = amount_field("decimal string > 0, at most 6 decimals")
    description: str = Field("", max_length=200)


def attempt_out(a: Attempt) -> AttemptOut:
    return AttemptOut(
        id=a.id,
        wallet_id=a.wallet_id,
        trigger=a.trigger,
        amount=format_micros(a.amount_micros),
        currency=a.currency,
        status=a.status,
        charged=None
        if a.charged_minor is None
        else format_micros(minor_units_to_micros(a.charged_minor, a.currency)),
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


def payment_method_out(row: asyncpg.Record) -> PaymentMethodOut:
    return PaymentMethodOut(
        id=row["id"], brand=row["brand"], last4=row["last4"], is_default=row["is_default"]
    )
