"""The drained stop of ``make run`` (tally_devstack.drain): its picture of who consumes and
produces what matches the services, and the stop waits for each hop, in order, never longer
than its bound."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from tally.events import Topics
from tally.settings import SERVICE_PORTS
from tally_devstack import drain
from tally_devstack.drain import PRODUCES, STOP_ORDER, Account, Left, consumes

ROOT = Path(__file__).resolve().parents[2]


def test_every_service_stops_in_order_and_its_groups_are_known() -> None:
    assert sorted(STOP_ORDER) == sorted(SERVICE_PORTS)
    assert ("wallet", Topics.USAGE_RECORDED) in consumes("wallet")
    assert ("notifier-webhooks-wallet", Topics.WALLET_EVENTS) in consumes("notifier")


def test_the_produced_topics_are_the_ones_the_services_code_names() -> None:
    """Topics a service's code names outside its consumer table (as tests/unit/test_helm_chart
    reads them), less the dead-letter topics."""
    for service in STOP_ORDER:
        names: set[str] = set()
        for path in (ROOT / "services" / service / "src").rglob("*.py"):
            if path.name != "app.py":
                names |= set(re.findall(r"\bTopics\.([A-Z_]+)\b", path.read_text()))
        topics = {getattr(Topics, n) for n in names if isinstance(getattr(Topics, n, None), str)}
        assert set(PRODUCES[service]) == topics, service


def test_a_hop_waits_for_every_running_service_that_feeds_it() -> None:
    everyone = set(STOP_ORDER)
    # wallet -> recharge -> wallet and rebilling -> wallet: the cycle settles before the wallet stops
    assert drain.feeders("wallet", everyone - {"usage-meter"}) == ["wallet", "recharge", "rebilling"]
    assert drain.feeders("usage-meter", everyone) == ["usage-meter", "wallet", "recharge", "rebilling"]
    assert drain.feeders("notifier", {"notifier"}) == ["notifier"]


class FakeGauges:
    """Lag per (group, topic) that falls by ``step`` every time it is read; one outbox."""

    def __init__(self, lag: dict[tuple[str, str], int], step: int = 0) -> None:
        self.left = dict(lag)
        self.step = step
        self.stopped: list[str] = []
        self.reads_after_stop: list[str] = []

    async def lag(self, group: str, topic: str) -> int:
        n = self.left.get((group, topic), 0)
        self.left[(group, topic)] = max(n - self.step, 0)
        return n

    async def outbox(self, service: str) -> int:
        return 0

    async def in_flight(self, service: str) -> int:
        return 0


async def _run(gauges: FakeGauges, **kwargs: object) -> tuple[drain.Drained, list[str], list[str]]:
    running = set(STOP_ORDER)
    notes: list[str] = []
    statuses: list[str] = []

    async def stop(name: str) -> None:
        gauges.stopped.append(name)
        running.discard(name)

    result = await drain.drain(
        running=lambda name: name in running,
        stop=stop,
        gauges=gauges,
        poll=0.01,
        status=statuses.append,
        note=notes.append,
        **kwargs,  # type: ignore[arg-type]
    )
    return result, notes, statuses


async def test_services_stop_upstream_first_once_their_inputs_are_consumed() -> None:
    # the wallet's backlog holds usage-meter's stop too: usage-meter consumes wallet.digest
    gauges = FakeGauges({("wallet", Topics.USAGE_RECORDED): 30}, step=10)
    result, notes, statuses = await _run(gauges, hop_seconds=5)
    assert gauges.stopped == list(STOP_ORDER)
    assert result.gave_up == {}
    assert all("drained and stopped" in n for n in notes), notes
    assert any("wallet: 20 records on usage.recorded not consumed" in s for s in statuses), statuses
    assert gauges.left[("wallet", Topics.USAGE_RECORDED)] == 0


async def test_a_hop_that_does_not_drain_is_given_up_after_its_bound_and_said_in_one_line() -> None:
    gauges = FakeGauges({("wallet", Topics.USAGE_RECORDED): 120})  # never consumed
    started = time.monotonic()
    result, notes, _ = await _run(gauges, hop_seconds=0.2)
    assert time.monotonic() - started < 3  # bounded per hop, never a hang
    assert gauges.stopped == list(STOP_ORDER)
    assert notes[0] == (
        "usage-meter: stopped, gave up after 0.2 s: wallet: 120 records on usage.recorded not consumed"
    )
    assert notes[1] == (
        "wallet: stopped, gave up after 0.2 s: wallet: 120 records on usage.recorded not consumed"
    )
    assert [n.split(":")[0] for n in notes[2:]] == ["recharge", "rebilling", "notifier"]
    assert all("drained and stopped" in n for n in notes[2:])  # no longer fed by the wallet
    assert set(result.gave_up) == {"usage-meter", "wallet"}


async def test_a_second_interrupt_stops_the_rest_without_waiting() -> None:
    gauges = FakeGauges({("notifier-wallet", Topics.WALLET_DIGEST): 5})
    skip = asyncio.Event()
    skip.set()
    result, notes, _ = await _run(gauges, hop_seconds=60, skip=skip)
    assert gauges.stopped == list(STOP_ORDER)
    assert result.skipped
    assert notes == [f"{name}: stopped without waiting (told not to)" for name in STOP_ORDER]


async def test_an_interrupt_during_a_wait_says_what_was_left() -> None:
    gauges = FakeGauges({("wallet", Topics.USAGE_RECORDED): 1})
    skip = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, skip.set)
    started = time.monotonic()
    _, notes, _ = await _run(gauges, hop_seconds=60, skip=skip)
    assert time.monotonic() - started < 3
    assert (
        notes[0] == "usage-meter: stopped, told not to wait: wallet: 1 record on usage.recorded not consumed"
    )
    assert notes[1:] == [f"{name}: stopped without waiting (told not to)" for name in STOP_ORDER[1:]]


async def test_a_gauge_that_fails_gives_the_hop_up_instead_of_hanging() -> None:
    class Broken(FakeGauges):
        async def lag(self, group: str, topic: str) -> int:
            raise ConnectionError("broker gone")

    gauges = Broken({})
    result, notes, _ = await _run(gauges, hop_seconds=60)
    assert gauges.stopped == list(STOP_ORDER)
    assert (
        notes[0]
        == "usage-meter: stopped, without waiting: usage-meter: not measured (ConnectionError: broker gone)"
    )
    assert notes[1:] == [
        f"{name}: stopped without waiting (nothing to measure with)" for name in STOP_ORDER[1:]
    ]
    assert list(result.gave_up) == ["usage-meter"]


async def test_the_account_after_the_stop_names_what_went_with_the_broker() -> None:
    gauges = FakeGauges(
        {("wallet", Topics.USAGE_RECORDED): 120, ("rebilling-cards", Topics.RECHARGE_EVENTS): 2}
    )

    async def outbox(service: str) -> int:
        return 3 if service == "wallet" else 0

    gauges.outbox = outbox  # type: ignore[method-assign]

    async def dead() -> dict[str, int]:
        return {"usage.ingest.dlq": 4, "wallet.events.dlq": 0}

    counted = await drain.account(gauges, dead)
    clean, line = counted.summary()
    assert not clean
    assert line == (
        "gone with the broker: wallet: 120 records on usage.recorded not consumed; "
        "rebilling: 2 records on recharge.events not consumed; "
        "dead letters gone with it: 4 on usage.ingest.dlq; "
        "kept in Postgres for the next start: wallet 3 outbox messages"
    )
    assert Account().summary() == (
        True,
        "drained: every record relayed was consumed; nothing is lost with the broker",
    )


@pytest.mark.parametrize(
    "count, text", [(5, "wallet: 5 records"), (1, "wallet: 1 record"), (0, "wallet: record{s}")]
)
def test_a_left_item_reads_as_one_phrase(count: int, text: str) -> None:
    assert str(Left("wallet", count, "record{s}")) == text
