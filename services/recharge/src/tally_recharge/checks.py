"""What makes recharge look at a wallet again: every change that may make the auto-recharge
rule hold (or stop holding) queues a check of that wallet (``recharge_checks``), which the
charger evaluates (``charging.Recharger.evaluate``). The triggers: the wallet's own changes
(``wallet.digest``: a threshold crossing, a credit, a settings change), a card attached,
detached or made default (``cards``), a company's Stripe connection changing (``companies``),
a recharge settled (``charging``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tally import events
from tally.db import Conn
from tally.telemetry import child_traceparent
from tally_recharge import storage
from tally_recharge.domain import WalletTarget

# The id of the wallet's settings event for an applied cancellation (wallet_settings: its cause
# is the recharge.failed event that disabled auto-recharge).
CANCELLATION_APPLIED = "wallet.settings_changed:recharge.failed:"
WALLET_TRIGGERS = ("wallet.threshold_crossed", "wallet.credited", "wallet.settings_changed")


@dataclass(frozen=True)
class WalletChange:
    """One of ``WALLET_TRIGGERS``, with the trace of the record that brought it."""

    id: str  # the event's id
    data: events.WalletRef
    traceparent: str | None


async def wallets_changed(conn: Conn, changes: Sequence[WalletChange]) -> None:
    """In the caller's transaction, each change once (the caller's inbox): queue a check of
    each wallet; a credit of a recharge also ends its flight; the wallet's own application of
    a cancellation ends the cancelling state."""
    # Lock order, as the charger's: wallets by id; per wallet its check row, then its policy
    # and attempts (replicas and the charger never wait on each other in a ring).
    for change in sorted(changes, key=lambda c: c.data.wallet_id):
        p = change.data
        traceparent = child_traceparent(
            change.traceparent, "recharge.request", {"tally.wallet_id": p.wallet_id}
        )
        await storage.queue_check(conn, p.owner, p.company_id, p.account_id, traceparent)
        if isinstance(p, events.WalletCredited) and p.transfer_id.startswith("recharge:"):
            await storage.mark_credited(conn, p.transfer_id.removeprefix("recharge:"))
        if isinstance(p, events.WalletSettingsChanged) and change.id.startswith(CANCELLATION_APPLIED):
            # the wallet applied the cancellation itself (not an older "off" that arrived
            # late): from now on its live settings are the truth
            await storage.set_policy(conn, p.wallet_id, cancelling=False)


async def cards_changed(conn: Conn, target: WalletTarget, *, bring_forward: bool) -> None:
    """In the caller's transaction: the owner's cards changed; check its wallet again."""
    # Lock order, as the charger's: the wallet's check row first, then its attempts.
    await storage.queue_check(conn, target.owner, target.company_id, target.account_id)
    if bring_forward:  # a retry waiting for its time tries the new card now
        await storage.bring_forward(conn, target.wallet_id)
