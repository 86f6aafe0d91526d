"""Recharge rules, pure: how much to charge, which card first, when to retry or give up, and
when smart adjustment raises a wallet's reload tier."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from tally.money import MICROS_PER_UNIT

# Reload tiers (currency units): smart adjustment moves a wallet up one rung at a time.
TIERS = tuple(t * MICROS_PER_UNIT for t in (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
RAISE_AFTER = 3  # auto-recharges ...
RAISE_WINDOW = timedelta(hours=24)  # ... within this window raise the tier


def auto_amount(balance: int, threshold: int, reload_amount: int) -> int:
    """The reload amount; when that would still leave the wallet below its threshold, enough to
    lift it to the threshold plus the reload amount."""
    if balance + reload_amount >= threshold:
        return reload_amount
    return threshold - balance + reload_amount


def next_tier(reload_amount: int) -> int | None:
    """The first tier above the current reload amount (None at the top of the ladder)."""
    for tier in TIERS:
        if tier > reload_amount:
            return tier
    return None


def should_raise_tier(recent_auto_successes: int, smart_adjustment: bool) -> bool:
    return smart_adjustment and recent_auto_successes >= RAISE_AFTER


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
    def from_env(cls, text: str | None) -> RetryPolicy:
        if not text:
            return cls()
        return cls(tuple(timedelta(seconds=int(x)) for x in text.split(",") if x.strip()))
