"""Attacks on ``tally dlq replay`` on the money path, from a review of the change that made
replays exact (docs/0023): letters of ``usage.ingest`` replayed into the whole stack, and what
the ledger says after. The broker-only side (poison letters, commit order, concurrent and
interrupted replays) is tests/integration/test_dlq_replay_attacks.py. The first three broke
the first version (the event was charged); all now hold.

- A message one byte longer than a letter keeps... (``LETTER_TEXT_KEPT`` + 2 bytes, one byte
  not UTF-8, padded with JSON whitespace): its cut text encodes to the message's length
  (U+FFFD is 3 bytes), and was replayed as valid text. Now passed over.
- A letter written before the change of a message not UTF-8 (text with U+FFFD, no
  ``message_bytes``) was replayed as that text. Now passed over.
- A letter whose ``message`` names one company and whose ``message_base64`` another charged
  the other. Now passed over: the text is not a rendering of the bytes.
- Two replays at once send a letter twice; the event is charged once (event-id dedupe).
- A message of 0xFF bytes as long as a letter keeps (text and base64 in its letter) reaches
  the DLQ, and usage-meter's outbox goes on; one of a megabyte is cut, its letter below 1 MiB."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tally.events import LETTER_TEXT_KEPT
from tally.settings import Settings
from tally_cli import dlq
from tests.support.builders import funded
from tests.support.stack import Tally, eventually, uid

DLQ = "usage.ingest.dlq"


def event(cid: str, eid: str) -> dict[str, Any]:
    return {"event_id": eid, "company_id": cid, "service": "email", "quantity": "1"}


def letter(message: str, **extra: Any) -> bytes:
    """A letter of ``usage.ingest`` as a producer on its DLQ may write it."""
    return orjson.dumps(
        {
            "error": "not a usage event",
            "source_topic": "usage.ingest",
            "partition": 0,
            "offset": 0,
            "failed_by": "usage-meter",
            "failed_at": "2026-12-01T00:00:00Z",
            "message": message,
            **extra,
        }
    )


async def charged(tally: Tally, cid: str, eid: str) -> list[dict[str, Any]]:
    return [t for t in await tally.company_transactions(cid) if t["usage_event_id"] == eid]


async def after_sentinel(tally: Tally, cid: str) -> None:
    e = event(cid, uid("sentinel"))
    await tally.produce("usage.ingest", e, key=cid)
    await tally.wait_applied(cid, e["event_id"])


async def letters_of(eid: str) -> list[dict[str, Any]]:
    return [x for x in await dlq.read("usage.ingest", limit=10_000) if eid in x["message"]]


@pytest.fixture
def replayer(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> Tally:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=tally.stack.bootstrap))
    return tally


async def produce_big(tally: Tally, topic: str, value: bytes, key: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap, max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


async def test_a_message_cut_to_its_own_length_is_not_replayed(replayer: Tally) -> None:
    tally = replayer
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    body = orjson.dumps(e)[:-1] + b',"x":"\xff"}'
    value = body + b" " * (LETTER_TEXT_KEPT - len(body)) + b"  "
    await produce_big(tally, "usage.ingest", value, cid)

    async def one_letter() -> list[dict[str, Any]] | None:
        found = await letters_of(e["event_id"])
        return found if len(found) == 1 else None

    (held,) = await eventually(one_letter, what="the letter", timeout=60)
    assert held["message_bytes"] == len(value) and held.get("message_base64") is None
    await after_sentinel(tally, cid)
    assert await charged(tally, cid, e["event_id"]) == []  # dead-lettered, not charged

    done = await dlq.replay("usage.ingest")
    assert [x["message_bytes"] for x in done.not_replayable if e["event_id"] in x["message"]] == [len(value)]
    await after_sentinel(tally, cid)
    assert await charged(tally, cid, e["event_id"]) == []


async def test_an_old_letter_of_bytes_not_utf8_is_not_replayed(replayer: Tally) -> None:
    tally = replayer
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    failed = orjson.dumps(e)[:-1] + b',"x":"\xff"}'
    await tally.produce("usage.ingest", failed, key=cid)
    await after_sentinel(tally, cid)
    assert await charged(tally, cid, e["event_id"]) == []
    # as the letter was written before 2026-12-05: the text alone
    await tally.produce(DLQ, letter(failed.decode("utf-8", "replace")), key=cid)
    done = await dlq.replay("usage.ingest")
    assert [x for x in done.not_replayable if e["event_id"] in x["message"]]
    await after_sentinel(tally, cid)
    assert await charged(tally, cid, e["event_id"]) == []


async def test_two_replays_at_once_charge_an_event_once(replayer: Tally) -> None:
    """HOLDS: both replays send the letter (no fencing), the ledger has the event once."""
    tally = replayer
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    await dlq.replay("usage.ingest")  # what earlier tests left
    await tally.produce(
        DLQ, letter(orjson.dumps(e).decode(), message_exact=True, message_bytes=len(orjson.dumps(e))), key=cid
    )
    a, b = await asyncio.gather(dlq.replay("usage.ingest"), dlq.replay("usage.ingest"))
    print("replayed", a.replayed, b.replayed)
    await tally.wait_applied(cid, e["event_id"], timeout=60)
    await after_sentinel(tally, cid)
    assert len(await charged(tally, cid, e["event_id"])) == 1


async def test_a_letter_naming_one_company_in_its_text_and_another_in_its_bytes_charges_none(
    replayer: Tally,
) -> None:
    """``dlq list`` shows ``message`` (company A's event); the bytes in ``message_base64`` are
    company B's. The first version replayed the bytes, and B was charged."""
    tally = replayer
    a, b = await funded(tally), await funded(tally)
    eid = uid("ev")
    shown, sent = event(a, eid), event(b, eid)
    await tally.produce(
        DLQ,
        letter(orjson.dumps(shown).decode(), message_base64=base64.b64encode(orjson.dumps(sent)).decode()),
        key=a,
    )
    listed = await eventually(lambda: letters_of(eid), what="the letter")
    assert orjson.loads(listed[0]["message"])["company_id"] == a
    done = await dlq.replay("usage.ingest")
    assert [x for x in done.not_replayable if eid in x["message"]]
    await after_sentinel(tally, a)
    await after_sentinel(tally, b)
    assert await charged(tally, a, eid) == []
    assert await charged(tally, b, eid) == []


async def test_messages_not_utf8_are_dead_lettered_and_usage_behind_them_is_charged(replayer: Tally) -> None:
    """A message of ``LETTER_TEXT_KEPT`` bytes, each 0xFF: its letter holds the text (U+FFFD)
    and the base64. One of a megabyte: cut, no base64, below 1 MiB (it was ~3 MB, and a Kafka
    broker's default message.max.bytes would have refused it and stopped the relay). Both
    letters reach the DLQ, and usage after them (another company's, relayed by the same
    outbox) is charged. Last in the file: were usage-meter's outbox to stop on a letter, it
    would stay stopped for the session."""
    tally = replayer
    cid = await funded(tally)
    marker = uid("mb").encode()
    value = marker + b"\xff" * (LETTER_TEXT_KEPT - len(marker))
    await produce_big(tally, "usage.ingest", value, cid)
    megabyte = marker + b"-mb" + b"\xff" * 1_000_000
    await produce_big(tally, "usage.ingest", megabyte, cid)
    other = await funded(tally)
    await after_sentinel(tally, other)

    async def lettered() -> list[dict[str, Any]]:
        return [x for x in await dlq.read("usage.ingest", limit=10_000) if marker.decode() in x["message"]]

    async def both() -> list[dict[str, Any]] | None:
        found = await lettered()
        return found if len(found) == 2 else None

    held, cut = sorted(
        await eventually(both, what="the letters", timeout=60), key=lambda x: x["message_bytes"]
    )
    assert held["message_bytes"] == len(value)
    assert base64.b64decode(held["message_base64"]) == value
    assert cut["message_bytes"] == len(megabyte) and cut.get("message_base64") is None
    assert len(orjson.dumps(cut)) < 1024 * 1024
