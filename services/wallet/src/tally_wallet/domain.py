"""The ledger, pure: wallets, transfers and the events a posting causes. No I/O.

Every movement is a transfer from a debit wallet to a credit wallet of a positive amount, with
a unique idempotency key. A wallet's balance is credits minus debits. Posting a batch updates
balances in order and notes the edges it crosses:

- ``wallet.threshold_crossed`` when a debit takes a user wallet from at-or-above its threshold
  to below it (once per crossing, not once per debit). Precisely: a wallet is *armed* until a
  crossing fires and re-armed when a credit lifts it back to its threshold (or a settings
  change puts the threshold at or below its balance), so a wallet that
  starts below its threshold (a new wallet at 0) also fires at its first debit — that is the
  pre-load of the spec;
- ``wallet.suspended`` when a user wallet's balance goes below zero;
- ``wallet.reactivated`` when a credit brings a suspended wallet back to zero or above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, NamedTuple

from tally.money import MoneyError, apply_markup, parse_markup

Kind = Literal["company", "account", "system"]
TransferKind = Literal[
    "usage", "recharge", "top_up", "manual_credit", "credit_request", "refund", "adjustment"
]

SYSTEM_PLATFORM_REVENUE = "platform_revenue"
SYSTEM_COMPANY_REVENUE = "company_revenue"
SYSTEM_STRIPE_CLEARING = "stripe_clearing"
SYSTEM_MANUAL_CREDITS = "manual_credits"


def company_wallet_id(company_id: str) -> str:
    return f"company:{company_id}"


def account_wallet_id(account_id: str) -> str:
    return f"account:{account_id}"


def system_wallet_id(name: str, currency: str, company_id: str | None = None) -> str:
    """System wallets per currency (and per company for company revenue)."""
    return f"system:{name}:{currency}" if company_id is None else f"system:{name}:{company_id}:{currency}"


def platform_revenue_wallet_id(currency: str, partition: int) -> str:
    """The platform's revenue from usage, one wallet per ``usage.recorded`` partition: every
    batch credits it, so one shared wallet would make the wallet replicas' transactions wait
    for each other on its row; a partition has one consumer at a time (docs/0006). The
    platform's revenue in a currency is the sum of these wallets (``system:platform_revenue:%``)."""
    return f"system:{SYSTEM_PLATFORM_REVENUE}:p{partition}:{currency}"


@dataclass
class Wallet:
    id: str
    kind: Kind
    currency: str
    company_id: str | None = None
    account_id: str | None = None
    balance: int = 0
    threshold: int = 10_000_000
    reload_amount: int = 50_000_000
    auto_recharge: bool = True
    smart_adjustment: bool = True
    status: str = "active"
    armed: bool = True  # the next debit below the threshold is a crossing

    @property
    def is_user(self) -> bool:
        return self.kind != "system"

    def ref(self) -> dict[str, Any]:
        assert self.kind != "system"
        return {
            "wallet_id": self.id,
            "owner": self.kind,
            "company_id": self.company_id,
            "account_id": self.account_id,
            "currency": self.currency,
        }


# Transfer and Posted are built once or twice per usage event: NamedTuples, immutable like
# the frozen dataclasses they replaced, are built in a third of the time (~0.35 against ~1 µs).
class RatedOnOldSettings(Exception):
    """A usage batch was rated by rebilling settings that changed before it could commit: it
    is rolled back and rated again (not a ledger error: nothing is wrong with the usage)."""


class Transfer(NamedTuple):
    key: str
    debit: str
    credit: str
    amount: int
    kind: TransferKind
    service: str | None = None
    usage_event_id: str | None = None
    reference: str | None = None
    # a usage event's company leg: the account that used it, when usage-meter recorded it
    # (by which later-heard rebilling settings re-rate it, ``rerating``) and when it occurred
    account_id: str | None = None
    recorded_at: datetime | None = None
    occurred_at: datetime | None = None


class Posted(NamedTuple):
    transfer: Transfer
    debit_after: int
    credit_after: int


@dataclass(frozen=True)
class WalletEvent:
    type: str
    wallet_id: str
    data: dict[str, Any]
    cause: str  # the transfer key that caused it (deterministic event ids)


class LedgerError(ValueError):
    pass


class BalanceOutOfRange(LedgerError):
    """A transfer that would take a balance past what the database holds (BIGINT micros):
    ``storage.post`` raises it when Postgres refuses the balance update."""


@dataclass
class Posting:
    """Applies transfers to in-memory wallets (loaded and locked by the caller)."""

    wallets: dict[str, Wallet]
    posted: list[Posted] = field(default_factory=list)
    events: list[WalletEvent] = field(default_factory=list)

    def apply(self, t: Transfer) -> Posted:
        if t.amount <= 0:
            raise LedgerError(f"transfer {t.key}: amount must be positive")
        if t.debit == t.credit:
            raise LedgerError(f"transfer {t.key}: debit and credit are the same wallet")
        debit, credit = self.wallets[t.debit], self.wallets[t.credit]
        if debit.currency != credit.currency:
            raise LedgerError(
                f"transfer {t.key}: {debit.currency} wallet cannot pay a {credit.currency} wallet"
            )
        before = debit.balance
        debit.balance -= t.amount
        credit.balance += t.amount
        if debit.is_user:
            self._after_debit(debit, before, t)
        if credit.is_user:
            self._after_credit(credit, t)
        p = Posted(t, debit.balance, credit.balance)
        self.posted.append(p)
        return p

    def _after_debit(self, w: Wallet, before: int, t: Transfer) -> None:
        if w.armed and w.balance < w.threshold:
            w.armed = False
            self.events.append(
                WalletEvent(
                    "wallet.threshold_crossed",
                    w.id,
                    {
                        **w.ref(),
                        "balance_micros": w.balance,
                        "threshold_micros": w.threshold,
                        "reload_amount_micros": w.reload_amount,
                        "auto_recharge": w.auto_recharge,
                        "smart_adjustment": w.smart_adjustment,
                    },
                    t.key,
                )
            )
        if w.balance < 0 and w.status == "active":
            w.status = "suspended"
            self.events.append(
                WalletEvent("wallet.suspended", w.id, {**w.ref(), "balance_micros": w.balance}, t.key)
            )

    def _after_credit(self, w: Wallet, t: Transfer) -> None:
        if w.balance >= w.threshold:
            w.armed = True
        if w.balance >= 0 and w.status == "suspended":
            w.status = "active"
            self.events.append(
                WalletEvent("wallet.reactivated", w.id, {**w.ref(), "balance_micros": w.balance}, t.key)
            )


@dataclass(frozen=True)
class Rebilling:
    """An account's rebilling settings as the wallet applies them."""

    mode: Literal["off", "rebill", "rebill_markup"]
    markups: dict[str, Decimal]
    active: bool = True  # False until the account has a valid card

    def account_amount(self, service: str, platform_amount: int) -> int | None:
        """What the account pays for usage that cost the company ``platform_amount``; None when
        the account is not rebilled (only the company wallet is debited)."""
        if self.mode == "off" or not self.active:
            return None
        if self.mode == "rebill":
            return platform_amount
        markup = self.markups.get(service) or self.markups.get("default") or Decimal(1)
        return apply_markup(platform_amount, markup)


def parse_markups(raw: dict[str, str]) -> dict[str, Decimal]:
    """Markups (tally.money.parse_markup) as Decimals; LedgerError for one out of the rule."""
    try:
        return {service: parse_markup(text, field=f"markup {service}") for service, text in raw.items()}
    except MoneyError as exc:
        raise LedgerError(str(exc)) from exc


ServiceReason = Literal["ok", "account_wallet_empty", "agency_wallet_empty", "no_license"]


def service_status(account: Wallet | None, company: Wallet | None, licenses: int | None) -> ServiceReason:
    """Why an account may or may not use platform services. A negative account wallet is the
    client's own empty wallet; an empty agency wallet while the client still has balance is
    the agency-assistance case; a workspace with no assigned license cannot use the product."""
    if licenses is not None and licenses <= 0:
        return "no_license"
    if account is not None and account.status == "suspended":
        return "account_wallet_empty"
    if company is not None and company.status == "suspended":
        return "agency_wallet_empty"
    return "ok"
