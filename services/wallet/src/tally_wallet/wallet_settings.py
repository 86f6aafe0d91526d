"""Changing a wallet's auto-recharge settings: an owner's PATCH, a reload tier raised by smart
adjustment, auto-recharge cancelled after repeated failures. Each change is published as
``wallet.settings_changed`` (with the balance then), on which the recharge service evaluates
the auto-recharge rule again: turning auto-recharge back on, or raising the threshold above
the balance, recharges the wallet without waiting for usage (docs/0008)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tally import events, outbox
from tally.autorecharge import next_tier
from tally.db import Conn
from tally.errors import money_field
from tally_wallet import storage
from tally_wallet.domain import Wallet
from tally_wallet.messages import SOURCE, wallet_rows


@dataclass(frozen=True)
class SettingsPatch:
    """An owner's change as sent (decimal strings unparsed: they are checked after the tenant
    check, so another tenant's wallet is a 404 whatever the body holds)."""

    threshold: str | None = None
    reload_amount: str | None = None
    auto_recharge: bool | None = None
    smart_adjustment: bool | None = None

    def changes(self) -> dict[str, Any]:
        """The changes in micros; a 422 naming the field for an amount out of the rules."""
        out: dict[str, Any] = {}
        if self.threshold is not None:
            out["threshold"] = money_field(self.threshold, "threshold", allow_zero=True)
        if self.reload_amount is not None:
            out["reload_amount"] = money_field(self.reload_amount, "reload_amount")
        if self.auto_recharge is not None:
            out["auto_recharge"] = self.auto_recharge
        if self.smart_adjustment is not None:
            out["smart_adjustment"] = self.smart_adjustment
        return out


async def change_settings(conn: Conn, wallet: Wallet, changes: dict[str, Any], *, cause: str) -> Wallet:
    """Apply ``changes`` (threshold, reload_amount, auto_recharge, smart_adjustment) to
    ``wallet`` (created with defaults if it never moved) in the caller's transaction, and
    publish the settings after. ``cause`` makes the event id deterministic for changes caused
    by another message (a redelivery publishes nothing new)."""
    [locked] = (await storage.lock_wallets(conn, [wallet])).values()
    await storage.update_wallet_settings(conn, locked.id, changes)
    current = await storage.get_wallet(conn, locked.id)
    assert current is not None
    await outbox.enqueue(conn, settings_rows(current, cause))
    return current


async def raise_tier(conn: Conn, wallet: Wallet, *, cause: str) -> Wallet | None:
    """Smart adjustment: one tier above the reload amount current now, and only while smart
    adjustment is still on (an owner may have turned it off, or set another amount, since the
    recharges that earned the raise). None when nothing changes."""
    [locked] = (await storage.lock_wallets(conn, [wallet])).values()
    new = next_tier(locked.reload_amount)
    if not locked.smart_adjustment or new is None:
        return None
    return await change_settings(conn, locked, {"reload_amount": new}, cause=cause)


def settings_rows(w: Wallet, cause: str) -> list[outbox.Row]:
    changed = events.WalletSettingsChanged(
        **w.ref(),
        balance_micros=w.balance,
        threshold_micros=w.threshold,
        reload_amount_micros=w.reload_amount,
        auto_recharge=w.auto_recharge,
        smart_adjustment=w.smart_adjustment,
    )
    return wallet_rows(
        w.company_id,
        events.envelope(
            "wallet.settings_changed", changed, source=SOURCE, id_=f"wallet.settings_changed:{cause}"
        ),
    )
