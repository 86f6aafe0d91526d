"""Attacks on ``tally dlq replay`` (tally_cli.dlq) and ``DeadLetter.original()`` against the
real broker, from a review of the change that made replays exact (docs/0023). "A replay sends
the bytes that failed, or nothing": what broke it first is marked, and now holds.

Topic: ``recharge.events``, which no service consumes in this layer and no other integration
test touches. Each test first replays what earlier tests left."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.consumer import dlq_row
from tally.events import LETTER_TEXT_KEPT, DeadLetter, Topics
from tally.settings import Settings
from tally_cli import dlq
from tally_devstack.stack import Stack
from tests.support.stack import messages_containing, uid

TOPIC = Topics.RECHARGE_EVENTS
DLQ = Topics.dlq(TOPIC)
GROUP = f"tally-cli-replay-{TOPIC}"


def fields(offset: int = 0) -> dict[str, Any]:
    return {
        "error": "poison",
        "source_topic": TOPIC,
        "partition": 0,
        "offset": offset,
        "failed_by": "recharge",
        "failed_at": datetime.now(UTC),
    }


def crafted(message: str, **extra: Any) -> bytes:
    """A letter as a producer on ``<topic>.dlq`` may write it (extra keys as given)."""
    return orjson.dumps({**fields(), "failed_at": "2026-12-05T00:00:00Z", "message": message, **extra})


@pytest.fixture
async def ready(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=stack.bootstrap))
    await dlq.replay(TOPIC, state=True)  # what earlier tests left
    return stack


async def send_letters(
    stack: Stack, letters: list[bytes], *, timestamps: list[int] | None = None
) -> list[int]:
    """Write ``letters`` to partition 0 of the DLQ; their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        offsets = []
        for i, value in enumerate(letters):
            ts = timestamps[i] if timestamps else None
            md = await producer.send_and_wait(DLQ, value, key=b"k", partition=0, timestamp_ms=ts)
            offsets.append(md.offset)
        return offsets
    finally:
        await producer.stop()


async def raw_on_topic(stack: Stack, marker: bytes) -> list[bytes]:
    return await messages_containing(stack.bootstrap, TOPIC, marker)


async def committed(stack: Stack) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, group_id=GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(DLQ, 0))
        return offset
    finally:
        await consumer.stop()


# --- 1. a message longer than a letter keeps, whose cut text encodes to exactly its length ----


def cut_to_its_own_length() -> bytes:
    """``LETTER_TEXT_KEPT`` + 2 bytes: a JSON object padded with spaces to ``LETTER_TEXT_KEPT``
    bytes, one byte not UTF-8 in a string, then two more spaces. Its text is cut to
    ``LETTER_TEXT_KEPT`` characters; U+FFFD is 3 bytes where 0xFF was 1, so the cut text
    encodes to the message's length. The first version replayed that text (valid UTF-8)."""
    body = b'{"marker":"' + uid("cut").encode() + b'","x":"\xff"}'
    return body + b" " * (LETTER_TEXT_KEPT - len(body)) + b"  "


def test_a_cut_letter_whose_text_encodes_to_the_message_length_holds_no_original() -> None:
    value = cut_to_its_own_length()
    letter = DeadLetter.holding(value, **fields())
    assert letter.message_bytes == len(value) == LETTER_TEXT_KEPT + 2
    assert len(letter.message.encode()) == len(value)  # the lengths agree
    assert letter.message_exact is False and letter.message_base64 is None
    assert letter.original() is None


async def test_a_cut_letter_is_passed_over(ready: Stack) -> None:
    """The letter, written by the consumers' own ``dlq_row``, is reported, not replayed."""
    value = cut_to_its_own_length()
    marker = value[11 : value.index(b'"', 11)]
    record = SimpleNamespace(topic=TOPIC, partition=0, offset=7, key=b"k", value=value)
    _, _, letter_value, _, _ = dlq_row(record, "not UTF-8", service="recharge")
    assert len(letter_value) < 1024 * 1024  # below a Kafka broker's default message.max.bytes
    (offset,) = await send_letters(ready, [letter_value])

    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 0
    assert [(x["offset"], x["message_bytes"]) for x in done.not_replayable] == [(7, len(value))]
    assert await raw_on_topic(ready, marker) == []
    assert await committed(ready) == offset + 1


# --- 2. a letter whose message_base64 is not base64 -------------------------------------------


@pytest.mark.parametrize("bad", ["not base64!", "QQ", "QQ==\n", "\u00e9"])
async def test_a_letter_of_invalid_base64_is_passed_over_and_the_letters_behind_it_go(
    ready: Stack, bad: str
) -> None:
    """The first version raised for the whole replay, dry run too, before anything was sent
    or committed: the letters behind it were never replayed, however often the command ran."""
    marker = uid("blocked")
    poison, good = await send_letters(
        ready, [crafted("x", message_base64=bad), crafted(orjson.dumps({"marker": marker}).decode())]
    )
    assert good == poison + 1
    dry = await dlq.replay(TOPIC, dry_run=True, state=True)
    assert dry.replayed == 1 and [x["dlq_offset"] for x in dry.not_replayable] == [poison]
    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 1 and [x["dlq_offset"] for x in done.not_replayable] == [poison]
    assert len(await raw_on_topic(ready, marker.encode())) == 1
    assert await committed(ready) == good + 1


async def test_a_record_that_is_no_letter_is_passed_over_by_list_and_replay(ready: Stack) -> None:
    """Anything on a DLQ topic that is not a letter (garbage, an empty value): listed as such,
    passed over by a replay, never stopping it."""
    marker = uid("after-garbage")
    garbage, empty, _ = await send_letters(
        ready, [b"\x00not json", b"", crafted(orjson.dumps({"marker": marker}).decode())]
    )
    listed = {x["dlq_offset"]: x for x in await dlq.read(TOPIC, limit=10_000)}
    assert listed[garbage]["error"] == listed[empty]["error"] == "not a dead letter"
    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 1 and [x["dlq_offset"] for x in done.not_replayable] == [garbage, empty]
    assert len(await raw_on_topic(ready, marker.encode())) == 1


async def test_the_cli_reports_a_letter_it_passes_over_and_exits_0(ready: Stack) -> None:
    (poison,) = await send_letters(ready, [crafted("x", message_base64="QQ")])
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tally_cli", "dlq", "replay", TOPIC, "--state", "--json"],
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ready.bootstrap},
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = orjson.loads(run.stdout)
    assert out["replayed"] == 0 and [x["dlq_offset"] for x in out["not_replayable"]] == [poison]
    assert await committed(ready) == poison + 1
    # the table says where the letter is and where its message is
    (garbage, poison) = await send_letters(ready, [b"garbage", crafted("x", message_base64="QQ")])
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tally_cli", "dlq", "replay", TOPIC, "--state"],
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": ready.bootstrap, "COLUMNS": "200"},
        capture_output=True,
        timeout=120,
    )
    said = run.stdout.decode()
    assert run.returncode == 0 and "replayed 0 message(s)" in said, said
    assert f"{DLQ} partition 0 offset {garbage} is no dead letter" in said
    assert f"{DLQ} partition 0 offset {poison} does not hold its message (still at {TOPIC}" in said


# --- 3. message_base64 that is not what message shows -----------------------------------------


async def test_a_letter_whose_base64_is_not_its_text_is_passed_over(ready: Stack) -> None:
    """``dlq list`` shows ``message``; a replay would send ``message_base64``. When the text is
    not a rendering of those bytes (a letter written by someone else, another company's event
    in the bytes), the letter is passed over. The first version sent the bytes."""
    marker = uid("b64")
    shown = orjson.dumps({"marker": marker, "shown": True}).decode()
    hidden = orjson.dumps({"marker": marker, "hidden": True})
    await send_letters(
        ready,
        [crafted(shown, message_base64=base64.b64encode(hidden).decode(), message_bytes=len(hidden))],
    )
    listed = [x for x in await dlq.read(TOPIC, limit=10_000) if marker in x["message"]]
    assert listed[0]["message"] == shown
    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 0 and len(done.not_replayable) == 1
    assert await raw_on_topic(ready, marker.encode()) == []


async def test_lying_message_bytes_is_passed_over_and_committed(ready: Stack) -> None:
    """``message_bytes`` that disagrees with the text passes the letter over, reported, and
    the group is committed past it (not replayed on a later run)."""
    marker = uid("lie")
    text = orjson.dumps({"marker": marker}).decode()
    (offset,) = await send_letters(ready, [crafted(text, message_exact=True, message_bytes=len(text) + 1)])
    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 0 and [x["offset"] for x in done.not_replayable] == [0]
    assert await raw_on_topic(ready, marker.encode()) == []
    assert await committed(ready) == offset + 1
    assert (await dlq.replay(TOPIC, state=True)).not_replayable == []


# --- 4. letters from before the change --------------------------------------------------------


async def test_an_old_letter_of_bytes_not_utf8_is_passed_over(ready: Stack) -> None:
    """A letter written before 2026-12-05 holds only text. U+FFFD in it says it may not be the
    message: passed over (the first version replayed it, and on ``usage.ingest`` it was
    charged: tests/e2e/test_dlq_replay_attacks.py). An old letter of UTF-8 text replays."""
    marker = uid("old")
    old_text = b'{"marker":"' + marker.encode() + b'","x":"\xff"}'
    fine = orjson.dumps({"marker": marker, "fine": True})
    await send_letters(ready, [crafted(old_text.decode("utf-8", "replace")), crafted(fine.decode())])
    done = await dlq.replay(TOPIC, state=True)
    assert done.replayed == 1 and len(done.not_replayable) == 1
    assert await raw_on_topic(ready, marker.encode()) == [fine]


# --- 5. the commit goes past the highest offset read ------------------------------------------


async def test_letters_out_of_timestamp_order_are_replayed_once(ready: Stack) -> None:
    """Letters are replayed in time order; a letter with a later timestamp before others in
    its partition (clocks of two replicas disagree) made the first version commit only past
    itself, and the next run sent the letters after it again."""
    marker = uid("ts")
    now = int(datetime.now(UTC).timestamp() * 1000)
    offsets = await send_letters(
        ready,
        [crafted(orjson.dumps({"marker": marker, "n": n}).decode()) for n in range(3)],
        timestamps=[now + 60_000, now, now + 1],  # the first is a minute ahead
    )
    assert (await dlq.replay(TOPIC, state=True)).replayed == 3
    assert await committed(ready) == offsets[-1] + 1
    assert (await dlq.replay(TOPIC, state=True)).replayed == 0
    sent = sorted(orjson.loads(v)["n"] for v in await raw_on_topic(ready, marker.encode()))
    assert sent == [0, 1, 2]


# --- 6. two replays at once -------------------------------------------------------------------


async def test_two_replays_at_once_both_send_every_letter(ready: Stack) -> None:
    """As designed, and documented: the replay group is used with ``assign`` (no membership,
    no fencing), so two shells running ``tally dlq replay`` together both send. Money rests on
    the consumers' dedupe on event ids (tests/e2e/test_dlq_replay_attacks.py)."""
    marker = uid("twice")
    await send_letters(ready, [crafted(orjson.dumps({"marker": marker, "n": n}).decode()) for n in range(3)])
    a, b = await asyncio.gather(dlq.replay(TOPIC, state=True), dlq.replay(TOPIC, state=True))
    sent = sorted(orjson.loads(v)["n"] for v in await raw_on_topic(ready, marker.encode()))
    print("replayed", a.replayed, b.replayed, "sent", sent)
    assert sent == [0, 0, 1, 1, 2, 2]


# --- 7. a replay that stops between its sends and its commit ----------------------------------


async def test_a_replay_interrupted_before_its_commit_sends_again_on_the_next_run(
    ready: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As designed (at least once, deduped by the consumers): sends, then a crash before the
    commit: the next run sends every letter again."""
    marker = uid("crash")
    await send_letters(ready, [crafted(orjson.dumps({"marker": marker, "n": n}).decode()) for n in range(2)])

    async def crash(self: Any, offsets: Any = None) -> None:
        raise RuntimeError("killed before the commit")

    with monkeypatch.context() as m:
        m.setattr(AIOKafkaConsumer, "commit", crash)
        with pytest.raises(RuntimeError):
            await dlq.replay(TOPIC, state=True)
    assert (await dlq.replay(TOPIC, dry_run=True, state=True)).replayed == 2  # dry run commits nothing
    assert (await dlq.replay(TOPIC, state=True)).replayed == 2
    sent = sorted(orjson.loads(v)["n"] for v in await raw_on_topic(ready, marker.encode()))
    assert sent == [0, 0, 1, 1]
    assert (await dlq.replay(TOPIC, state=True)).replayed == 0


# --- 8. letters arriving while a replay drains ------------------------------------------------


async def test_letters_written_during_a_replay_are_replayed_once_or_left_never_lost(ready: Stack) -> None:
    """A writer adding letters while replays run; every letter is sent exactly once in the end
    (replays run one after another) and every drain ends."""
    marker = uid("during")
    total = 60

    async def writer() -> None:
        for n in range(total):
            await send_letters(ready, [crafted(orjson.dumps({"marker": marker, "n": n}).decode())])

    task = asyncio.create_task(writer())
    while not task.done():
        await asyncio.wait_for(dlq.replay(TOPIC, state=True), timeout=60)
    await task
    await asyncio.wait_for(dlq.replay(TOPIC, state=True), timeout=60)
    sent = sorted(orjson.loads(v)["n"] for v in await raw_on_topic(ready, marker.encode()))
    assert sent == list(range(total))
