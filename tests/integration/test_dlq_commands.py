"""``tally dlq list`` and ``tally dlq replay`` (tally_cli.dlq) against the real broker.

- Letters written as one record batch, as an outbox relay writes a batch's letters. The
  embedded broker reports a partition's end as its last record batch's first offset plus one.
  Reading up to that end and no further hid the rest of the batch: the last letters of a batch
  were neither listed nor replayed until another letter came.
- A replay sends the message that failed, byte for byte. Letters held it as text, with U+FFFD
  for bytes that are not UTF-8, and a replay sent that text: a message dead-lettered for a
  byte that is not UTF-8 came back as another, valid message, and was charged. A message
  longer than a letter keeps was replayed cut."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tally.consumer import dlq_row
from tally.events import LETTER_TEXT_KEPT, DeadLetter, Topics
from tally.settings import Settings
from tally_cli import dlq
from tally_devstack.stack import Stack
from tests.support.stack import messages_containing, uid

TOPIC = Topics.REBILLING_EVENTS  # no service consumes it in this layer


def letter(marker: str, n: int) -> bytes:
    return (
        DeadLetter(
            error="poison",
            source_topic=TOPIC,
            partition=0,
            offset=n,
            failed_by="rebilling",
            failed_at=datetime.now(UTC),
            message=orjson.dumps({"marker": marker, "n": n}).decode(),
        )
        .model_dump_json()
        .encode()
    )


async def on_topic(stack: Stack, marker: str) -> list[int]:
    """The ``n`` of every message on ``TOPIC`` carrying ``marker``."""
    return sorted(orjson.loads(v)["n"] for v in await raw_on_topic(stack, marker.encode()))


async def raw_on_topic(stack: Stack, marker: bytes) -> list[bytes]:
    return await messages_containing(stack.bootstrap, TOPIC, marker)


async def test_letters_in_one_record_batch_are_all_listed_and_replayed_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap))
    marker = uid("batch")
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap)
    await producer.start()
    try:
        batch = producer.create_batch()
        for n in range(3):
            assert batch.append(key=marker.encode(), value=letter(marker, n), timestamp=None) is not None
        await (await producer.send_batch(batch, Topics.dlq(TOPIC), partition=0))
    finally:
        await producer.stop()

    listed = [orjson.loads(x["message"]) for x in await dlq.read(TOPIC, limit=10_000)]
    assert sorted(m["n"] for m in listed if m.get("marker") == marker) == [0, 1, 2]

    assert (await dlq.replay(TOPIC, dry_run=True, state=True)).replayed >= 3
    assert (await dlq.replay(TOPIC, state=True)).replayed >= 3
    assert await on_topic(stack, marker) == [0, 1, 2]
    assert (await dlq.replay(TOPIC, state=True)).replayed == 0  # each letter is replayed once
    assert await on_topic(stack, marker) == [0, 1, 2]


async def test_a_replay_sends_the_bytes_that_failed_or_passes_the_letter_over(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Letters written by the consumers' own ``dlq_row``: a message that is not UTF-8 comes
    back byte for byte; one longer than a letter keeps is listed and passed over, not cut."""
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap))
    await dlq.replay(TOPIC, state=True)  # what other tests left
    marker = uid("bytes").encode()
    not_utf8 = b'{"marker":"' + marker + b'","x":"\xff\xfe"}'
    utf8 = b'{"marker":"' + marker + '","x":"\u00e9\U0001f600"}'.encode()
    too_long = marker + b"a" * LETTER_TEXT_KEPT
    too_long_not_utf8 = marker + b"\xff" * LETTER_TEXT_KEPT
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        for offset, value in enumerate((not_utf8, utf8, too_long, too_long_not_utf8)):
            record = SimpleNamespace(topic=TOPIC, partition=0, offset=offset, key=marker, value=value)
            _, key, letter_value, _, _ = dlq_row(record, "poison", service="rebilling")
            await producer.send_and_wait(Topics.dlq(TOPIC), letter_value, key=key, partition=0)
    finally:
        await producer.stop()

    letters = [DeadLetter.model_validate(x) for x in await dlq.read(TOPIC, limit=10_000)]
    ours = [x for x in letters if marker.decode() in x.message]
    assert [x.message_bytes for x in ours] == [
        len(not_utf8),
        len(utf8),
        len(too_long),
        len(too_long_not_utf8),
    ]
    assert "\ufffd" in ours[0].message and ours[0].message_base64 is not None
    assert ours[1].message == utf8.decode() and ours[1].message_base64 is None
    assert [x.original() for x in ours] == [not_utf8, utf8, None, None]

    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 2
    assert sorted((x["offset"], x["message_bytes"]) for x in done.not_replayable) == [
        (2, len(too_long)),
        (3, len(too_long_not_utf8)),
    ]
    assert sorted(await raw_on_topic(stack, marker)) == sorted([not_utf8, utf8])
    again = await dlq.replay(TOPIC, state=True)
    assert again.replayed == 0 and again.not_replayable == []


async def test_a_topic_that_carries_state_is_replayed_only_when_asked(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A letter replayed goes to every consumer group of its topic, not only the one that
    failed on it. On a topic of state (licenses, settings, connections, suspensions) it is
    applied again over newer state: a review took a license back that way
    (tests/e2e/test_dlq_final_attacks.py). Only usage topics replay without ``--state``."""
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap))
    assert dlq.ADDITIVE == (Topics.USAGE_INGEST, Topics.USAGE_RECORDED)
    for topic in Topics.ALL:
        if topic in dlq.ADDITIVE:
            continue
        with pytest.raises(dlq.StateTopic, match="carries state"):
            await dlq.replay(topic)
        await dlq.replay(topic, dry_run=True)  # saying what it would do is harmless
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tally_cli", "dlq", "replay", Topics.REBILLING_EVENTS, "--json"],
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2 and b"--state" in run.stdout, run.stdout
