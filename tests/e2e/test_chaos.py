"""The short fault run inside `make test` (the long one is `make chaos`): SIGKILLs of every
consuming service, Postgres restarts and redeliveries during a stream of usage with rebilling
and recharges; then zero discrepancies."""

from __future__ import annotations

from tally_devstack.chaos import Chaos
from tests.support.stack import Tally


async def test_faults_leave_every_balance_right(tally: Tally) -> None:
    report = await Chaos(tally.stack, seconds=12, faults=7, seed=11).run()
    print("\n".join(report.lines()))
    assert report.fault_count >= 7  # every service killed once, Postgres restarted twice
    assert report.faults["postgres restart"] >= (2 if tally.stack.can_restart_postgres else 0)
    assert report.events_accepted > 100 and report.wallets_checked >= 6
    assert report.recharges_charged > 0
    assert report.discrepancies == []
