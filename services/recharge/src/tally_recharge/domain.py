"""Recharge rules, pure: which card first, when to retry or give up, and when smart adjustment
raises a wallet's reload tier (the auto-recharge rule itself and the tiers: ``tally.autorecharge``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

RAISE_AFTER = 3  # auto-recharges ...
RAISE_WINDOW = timedelta(hours=24)  # ... within this window raise the tier


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
