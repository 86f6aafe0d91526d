"""Recharge rules, pure: whose wallet a recharge is for, which card first, when to retry or give
up, why an automatic recharge is not wanted, and when smart adjustment raises a wallet's reload
tier (the auto-recharge rule itself and the tiers: ``tally.autorecharge``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tally.autorecharge import WalletState

RAISE_AFTER = 3  # auto-recharges ...
RAISE_WINDOW = timedelta(hours=24)  # ... within this window raise the tier


def should_raise_tier(recent_auto_successes: int, smart_adjustment: bool) -> bool:
    return smart_adjustment and recent_auto_successes >= RAISE_AFTER


@dataclass(frozen=True)
class WalletTarget:
    """The wallet a recharge credits (and whose owner's cards it charges): a company's
    (``company:<id>``) or an account's (``account:<id>``), in the company's currency."""

    wallet_id: str
    owner: str  # company | account
    company_id: str
    account_id: str | None
    currency: str

    @property
    def owner_id(self) -> str:
        return self.account_id if self.owner == "account" and self.account_id else self.company_id

    def ref(self) -> dict[str, Any]:
        return {
            "wallet_id": self.wallet_id,
            "owner": self.owner,
            "company_id": self.company_id,
            "account_id": self.account_id,
            "currency": self.currency,
        }


@dataclass(frozen=True)
class Card:
    id: str
    is_default: bool
    last_succeeded_at: datetime | None
    attached_seq: int


def card_order(cards: list[Card]) -> list[Card]:
    """Default first, then the others: most recently successful first, then newest attached."""

    def key(c: Card) -> tuple[int, float, int]:
        succeeded = c.last_succeeded_at.timestamp() if c.last_succeeded_at else float("-inf")
        return (0 if c.is_default else 1, -succeeded, -c.attached_seq)

    return sorted(cards, key=key)


def why_not(state: WalletState, usable_card: bool, cancelling: bool) -> str:
    """Why an automatic recharge is not wanted (the reason a dropped one is cancelled with)."""
    if not state.auto_recharge or cancelling:
        return "auto_recharge_off"
    if not usable_card:
        return "no_payment_method"
    return "balance_at_threshold"


@dataclass(frozen=True)
class RetryPolicy:
    """After a failed auto-recharge round: retry after ``delays[n-1]`` for the n-th consecutive
    failure; once there are ``len(delays) + 1`` failures in a row, turn auto-recharge off."""

    delays: tuple[timedelta, ...] = (timedelta(minutes=5), timedelta(minutes=30))

    def after_failure(self, consecutive: int) -> timedelta | None:
        """The wait before the next round, or None: give up (cancel auto-recharge)."""
        if consecutive <= len(self.delays):
            return self.delays[consecutive - 1]
        return None

    @classmethod
    def from_text(cls, text: str | None) -> RetryPolicy:
        """From ``TALLY_RECHARGE_RETRY_SECONDS`` (seconds, comma-separated); empty: the default."""
        if not text:
            return cls()
        return cls(tuple(timedelta(seconds=int(x)) for x in text.split(",") if x.strip()))
