"""rebilling's public representations (API.md): request and response bodies, and how
companies, accounts, license pools and subscriptions are rendered into them."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from pydantic import BaseModel, EmailStr, Field, field_validator

from tally.events import Rfc3339
from tally.ids import Id
from tally.money import MARKUP_PATTERN, amount_field, format_micros
from tally_rebilling.domain import current_period
from tally_rebilling.storage import Dunning

PlanName = Literal["starter", "unlimited", "saas_pro"]

# --- companies and accounts ------------------------------------------------------------------


class CompanyIn(BaseModel):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    plan: PlanName
    owner_email: EmailStr
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")


class CurrencyPinOut(BaseModel):
    """The currency money of a company is charged in, fixed for good (docs/0027)."""

    company_id: str
    currency: str = Field(description="the company's, or USD for a company no one created yet")


class CompanyOut(BaseModel):
    id: str
    name: str
    plan: PlanName
    owner_email: str
    currency: str
    stripe_connected: bool
    stripe_account_id: str | None
    created_at: str


class PlanIn(BaseModel):
    plan: PlanName


class PlanChangeOut(BaseModel):
    company: CompanyOut
    changed_accounts: list[dict[str, str]] = Field(
        description="accounts whose rebilling the new plan no longer allows: {account_id, from, to}"
    )


class ConnectIn(BaseModel):
    stripe_account_id: str = Field(pattern=r"^acct_[A-Za-z0-9_]{1,100}$")


class AccountIn(BaseModel):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    owner_email: EmailStr
    billing_model: Literal["self_billing", "stripe_connect_automated"] = "self_billing"
    saas_plan_id: Id | None = None


class AccountOut(BaseModel):
    id: str
    company_id: str
    name: str
    owner_email: str
    billing_model: str
    saas_plan_id: str | None
    has_valid_card: bool
    created_at: str


class RebillingIn(BaseModel):
    mode: Literal["off", "rebill", "rebill_markup"]
    markups: dict[str, Annotated[str, Field(json_schema_extra={"pattern": MARKUP_PATTERN})]] = Field(
        {}, description='per service or "default": a decimal string from "1" to "10"'
    )


class RebillingOut(BaseModel):
    account_id: str
    mode: Literal["off", "rebill", "rebill_markup"]
    markups: dict[str, str]
    active: bool = Field(description="false while the account has no valid card (pending)")
    version: int


class SaasPlanIn(BaseModel):
    id: Id
    name: str = Field(min_length=1, max_length=200)
    rebilling: RebillingIn


class SaasPlanOut(BaseModel):
    id: str
    name: str
    rebilling: RebillingIn


class CompanyPage(BaseModel):
    items: list[CompanyOut]
    next_cursor: str | None


class AccountPage(BaseModel):
    items: list[AccountOut]
    next_cursor: str | None


# --- licenses and seats ----------------------------------------------------------------------


class QuantityIn(BaseModel):
    quantity: int = Field(ge=1, le=100_000)


class PoolOut(BaseModel):
    total: int
    assigned: int
    available: int
    unit_price: str = Field(description="the platform's monthly price per license")


class PurchaseOut(BaseModel):
    id: str
    quantity: int
    amount: str
    status: Literal["pending", "charged", "failed"]


class BoughtOut(PoolOut):
    purchase: PurchaseOut


class AccountLicensesOut(BaseModel):
    account_id: str
    assigned: int
    pool: PoolOut


class InvitationIn(BaseModel):
    email: EmailStr
    role: Literal["user"] = "user"


class InvitationOut(BaseModel):
    id: str
    account_id: str
    email: str
    role: str
    status: Literal["pending", "accepted"]
    handoff: bool = Field(
        description="the provisional handoff: on acceptance the invitee "
        "becomes the owner and the agency admin's seat goes away"
    )


class MemberOut(BaseModel):
    email: str
    role: Literal["owner", "user", "agency_admin"]


class MemberList(BaseModel):
    items: list[MemberOut]
    next_cursor: str | None = None


class SeatPriceIn(BaseModel):
    amount: str = amount_field("decimal string >= 0: the monthly price per seat", allow_zero=True)


class SeatPriceOut(BaseModel):
    amount: str
    currency: str


# --- reselling -------------------------------------------------------------------------------


class CatalogRow(BaseModel):
    product: str
    name: str
    platform_price: str
    company_price: str
    period: Literal["month"] = "month"
    profit: str


class CatalogOut(BaseModel):
    items: list[CatalogRow]
    next_cursor: str | None = None


class ResoldPriceIn(BaseModel):
    company_price: str = amount_field("decimal string >= 0 per month", allow_zero=True)


class SubscriptionIn(BaseModel):
    product: str
    deployment: Literal["direct", "resell"]


class SubscriptionOut(BaseModel):
    id: str
    account_id: str | None = Field(description="null for a company's license pool")
    product: str
    deployment: str
    status: Literal["active", "past_due", "cancelled"]
    platform_price: str
    company_price: str
    quantity: int = Field(1, description="seats, or licenses in the pool")
    outstanding: str = Field(description="charged for but not yet collected (failed legs)")
    next_retry_at: str | None = Field(None, description="when a failed charge is tried again")
    failed_attempts: int = Field(
        0, description="failed charge tries of what is still outstanding (each leg, each period)"
    )
    cancel_at_period_end: bool
    created_period: str
    period: str | None = Field(None, description="on subscribe: the period charged at once")
    charge: str | None = Field(
        None, description="on subscribe: this period's charge: charged, failed (past_due, dunned) or pending"
    )


class SubscriptionPage(BaseModel):
    items: list[SubscriptionOut]
    next_cursor: str | None


class ReportLine(BaseModel):
    subscription_id: str
    account_id: str
    product: str
    deployment: str
    revenue: str
    platform_cost: str
    profit: str
    outstanding: str = Field(description="the account's price for the period not collected yet")


class ReportOut(BaseModel):
    period: str
    currency: str
    revenue: str = Field(description="collected from accounts (charged account legs)")
    platform_cost: str = Field(description="charged to the company (charged platform legs)")
    profit: str
    outstanding: str = Field(description="accounts' charges for the period not collected yet")
    platform_outstanding: str = Field(
        description="the company's platform charges for the period not collected yet"
    )
    lines: list[ReportLine]


# a billing period: a month of 1900-2099 (the runner's arithmetic stays inside datetime)
PERIOD_PATTERN = r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])$"


class RunOut(BaseModel):
    period: str = Field(pattern=PERIOD_PATTERN)
    outcomes: dict[str, int]


class RunIn(BaseModel):
    at: Rfc3339 | None = Field(None, description="the instant to run as (default: now)")
    company_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="only this company's subscriptions"
    )
    period: str | None = Field(
        None,
        pattern=PERIOD_PATTERN,
        description="the period to open (YYYY-MM; default: the one `at` falls in)",
    )

    @field_validator("at")
    @classmethod
    def _in_a_period(cls, at: datetime | None) -> datetime | None:
        # the written year is 1900-2099 (Rfc3339); its UTC month must be a period too (review
        # 2026-12-03: 2099-12-31T23:59:59-12:00 opened and charged 2100-01, which no report shows)
        if at is not None and not re.fullmatch(PERIOD_PATTERN, current_period(at)):
            raise ValueError("falls outside the periods 1900-01 to 2099-12 (UTC)")
        return at


# --- rendering -------------------------------------------------------------------------------


def company_out(c: asyncpg.Record) -> CompanyOut:
    return CompanyOut(
        id=c["id"],
        name=c["name"],
        plan=c["plan"],
        owner_email=c["owner_email"],
        currency=c["currency"],
        stripe_connected=c["stripe_account_id"] is not None,
        stripe_account_id=c["stripe_account_id"],
        created_at=c["created_at"].isoformat(),
    )


def account_out(a: asyncpg.Record) -> AccountOut:
    return AccountOut(
        id=a["id"],
        company_id=a["company_id"],
        name=a["name"],
        owner_email=a["owner_email"],
        billing_model=a["billing_model"],
        saas_plan_id=a["saas_plan_id"],
        has_valid_card=a["has_valid_card"],
        created_at=a["created_at"].isoformat(),
    )


def pool_out(total: int, assigned: int, unit_price: int) -> PoolOut:
    """A license pool, with the platform's monthly price per license (``Settings.license_price``)."""
    return PoolOut(
        total=total, assigned=assigned, available=total - assigned, unit_price=format_micros(unit_price)
    )


def subscription_out(
    sub: Any, dunning: Dunning, *, period: str | None = None, charge: str | None = None
) -> SubscriptionOut:
    """What the API shows of a subscription (``period``, ``charge``: on subscribe)."""
    return SubscriptionOut(
        id=sub["id"],
        account_id=sub["account_id"],
        product=sub["product"],
        deployment=sub["deployment"],
        status=sub["status"],
        platform_price=format_micros(sub["platform_price"]),
        company_price=format_micros(sub["company_price"]),
        quantity=sub["quantity"],
        outstanding=format_micros(dunning.outstanding),
        next_retry_at=dunning.next_retry_at.isoformat() if dunning.next_retry_at else None,
        failed_attempts=dunning.failed_attempts,
        cancel_at_period_end=sub["cancel_at_period_end"],
        created_period=sub["first_period"],
        period=period,
        charge=charge,
    )
