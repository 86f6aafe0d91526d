"""Third review of dead letters and ``tally dlq replay`` (after letters kept the record's key
byte for byte, and replays onto topics that carry state needed ``--state``). Not repeating
tests/integration/test_dlq_replay_attacks.py, tests/e2e/test_dlq_replay_attacks.py,
tests/e2e/test_dlq_final_attacks.py or tests/integration/test_dlq_commands.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tally.events import DeadLetter, Topics
from tally.settings import Settings
from tally_cli import dlq
from tests.support.builders import funded
from tests.support.stack import Tally, eventually, uid

BIG_KEY = 1_100_000  # bytes: more than a default producer's max_request_size (1 MiB)


@pytest.mark.parametrize(
    "topic",
    [
        "Usage.Ingest",
        "usage.ingest ",
        " usage.recorded",
        "usage.ingest.dlq",
        "rebilling.events.dlq",
        "rebilling.events\x00",
        "usage\u2024ingest",  # ONE DOT LEADER
    ],
)
async def test_a_misspelt_topic_is_refused_before_the_broker(topic: str) -> None:
    with pytest.raises(ValueError):
        await dlq.replay(topic)
    with pytest.raises(ValueError):
        await dlq.replay(topic, state=True)


@pytest.mark.parametrize("topic", [t for t in Topics.ALL if t not in dlq.ADDITIVE])
async def test_every_state_topic_needs_state(topic: str) -> None:
    with pytest.raises(dlq.StateTopic):
        await dlq.replay(topic)


@pytest.fixture
def replayer(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> Tally:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=tally.stack.bootstrap))
    return tally


def event(cid: str, eid: str) -> dict[str, Any]:
    return {"event_id": eid, "company_id": cid, "service": "email", "quantity": "1"}


def letter_of(raw: bytes, error: str) -> bytes:
    """The letter usage-meter writes for ``raw`` on usage.ingest (``DeadLetter.holding``)."""
    return (
        DeadLetter.holding(
            raw,
            error=error,
            source_topic="usage.ingest",
            partition=0,
            offset=0,
            failed_by="usage-meter",
            failed_at=datetime(2026, 12, 1, tzinfo=UTC),
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )


async def produce_raw(tally: Tally, topic: str, value: bytes, key: bytes | None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap, max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def charged(tally: Tally, cid: str, eid: str) -> list[dict[str, Any]]:
    return [t for t in await tally.company_transactions(cid) if t["usage_event_id"] == eid]


async def test_an_empty_key_event_is_charged_once_through_letter_and_replay(replayer: Tally) -> None:
    """A valid usage event with key b"" is charged; a letter of it (same bytes, key b"")
    replayed after it is not charged again."""
    tally = replayer
    await dlq.replay("usage.ingest")
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    raw = orjson.dumps(e)
    await produce_raw(tally, "usage.ingest", raw, b"")
    await tally.wait_applied(cid, e["event_id"], timeout=60)
    await produce_raw(
        tally,
        "usage.ingest.dlq",
        letter_of(raw, "x"),
        b"",
    )
    await dlq.replay("usage.ingest")
    sentinel = event(cid, uid("sentinel"))
    await produce_raw(tally, "usage.ingest", orjson.dumps(sentinel), b"")
    await tally.wait_applied(cid, sentinel["event_id"], timeout=60)
    assert len(await charged(tally, cid, e["event_id"])) == 1


async def test_a_huge_key_is_lettered_and_does_not_block_replays_of_other_letters(replayer: Tally) -> None:
    """A poison record on usage.ingest with a 1.1 MB key. The letter carries the key byte for
    byte; usage-meter's outbox must go on; and a replay must still send the other letters."""
    tally = replayer
    await dlq.replay("usage.ingest")  # what earlier tests left
    marker = uid("bigkey")
    await produce_raw(tally, "usage.ingest", b'{"poison":"' + marker.encode() + b'"', b"k" * BIG_KEY)

    # usage-meter's outbox goes on: an event behind it is charged
    cid = await funded(tally)
    e = event(cid, uid("after"))
    await tally.produce("usage.ingest", e, key=cid)
    await tally.wait_applied(cid, e["event_id"], timeout=60)

    async def lettered() -> list[dict[str, Any]] | None:
        found = [x for x in await dlq.read("usage.ingest", limit=10_000) if marker in x["message"]]
        return found or None

    (held,) = await eventually(lettered, what="the letter of the huge key", timeout=60)
    assert len(held["key"]) == BIG_KEY

    # a genuine letter after it (a usage event rejected, then the wallet is fine: replayable)
    cid2 = await funded(tally)
    e2 = event(cid2, uid("letter"))
    raw = orjson.dumps(e2)
    await tally.produce(
        "usage.ingest.dlq",
        letter_of(raw, "agency_wallet_suspended"),
        key=cid2,
    )
    # It broke: the CLI's producer (max_request_size 1 MiB) could not send the 1.1 MB letter;
    # the replay raised Unavailable("the broker is unreachable: MessageSizeTooLargeError"),
    # committed nothing, and every later replay of usage.ingest failed on the same letter. The
    # replay now allows what a relay sends (tally.kafka.MAX_REQUEST_BYTES).
    done = await dlq.replay("usage.ingest")  # must not fail on the huge key
    assert done.replayed >= 2  # the huge-keyed letter and the genuine one behind it
    await tally.wait_applied(cid2, e2["event_id"], timeout=60)
