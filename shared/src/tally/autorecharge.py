"""The auto-recharge rule (API.md, wallet), pure: one function decides whether a wallet is to be
recharged now, one how much, and the reload tier ladder smart adjustment climbs.

The wallet service owns the balance and the settings, the recharge service the cards and the
attempts; the recharge service evaluates the rule on the wallet's live state each time one of
its inputs may have changed (docs/0008)."""

from __future__ import annotations

from dataclasses import dataclass

from tally.money import MICROS_PER_UNIT

# Reload tiers (currency units): smart adjustment moves a wallet up one rung at a time.
TIERS = tuple(t * MICROS_PER_UNIT for t in (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000))


@dataclass(frozen=True)
class WalletState:
    """What the rule needs of a wallet, as the wallet service reports it."""

    balance: int
    threshold: int
    reload_amount: int
    auto_recharge: bool
    smart_adjustment: bool


def needs_recharge(
    *, auto_recharge: bool, has_card: bool, balance: int, threshold: int, in_flight: bool
) -> bool:
    """Whenever a wallet has auto-recharge on, a usable card, a balance below its threshold and
    no recharge in flight, it is recharged, whatever brought it there."""
    return auto_recharge and has_card and balance < threshold and not in_flight


def recharge_amount(balance: int, threshold: int, reload_amount: int) -> int:
    """The reload amount; when that would still leave the wallet below its threshold, enough to
    lift it to the threshold plus the reload amount. Computed from the balance at the moment of
    the charge."""
    if balance + reload_amount >= threshold:
        return reload_amount
    return threshold - balance + reload_amount


def next_tier(reload_amount: int) -> int | None:
    """The first tier above the current reload amount (None at the top of the ladder)."""
    for tier in TIERS:
        if tier > reload_amount:
            return tier
    return None
