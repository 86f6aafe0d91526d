"""A last round of attacks on dead letters and ``tally dlq replay`` (tally_cli.dlq), past those
of tests/integration/test_dlq_replay_attacks.py and tests/e2e/test_dlq_replay_attacks.py.

Held: ``DeadLetter.holding`` -> JSON -> ``original()`` gives the bytes the consumer received
or None, for arbitrary bytes and at the 100,000 boundaries (multibyte characters across the
cut, NUL, a BOM, encoded surrogates, control characters); a letter stays below 1 MiB.

Broke, and mended (the tests below hold now):

- ``tally dlq list <topic>`` (the table, its default) stopped with ``KeyError: 'failed_at'`` on
  any record of the DLQ that is not a letter: the first review made ``read`` describe such a
  record, without the keys the table reads.
- A record with a null value (a tombstone) was lettered as an empty message, and a replay sent
  an empty value: other bytes than the consumer received. Its letter now holds no bytes.
- An empty key became no key (a replay went to a random partition), and a key that is not
  UTF-8 became U+FFFD (another partition). A letter now carries the record's key byte for
  byte. No consumer keyed money by it (usage.recorded is keyed by company anew, dedupe is by
  id), but per-key order was lost.
- A replay goes to every consumer group of the topic, not only the one that dead-lettered the
  record. The wallet applies ``rebilling.events`` without an inbox or versions: a genuine
  ``license.changed`` lettered by another group (here the notifier's) and replayed after a
  newer one took the wallet's licenses back, and a workspace holding a license was refused
  service (``no_license``). A topic that carries state is now replayed only with ``--state``.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.consumer import dlq_row
from tally.events import LETTER_TEXT_KEPT, DeadLetter, Topics, dumps
from tally.settings import Settings
from tally_cli import dlq
from tests.support.attacks import after_the_forgery
from tests.support.builders import GOOD, Reseller, new_card
from tests.support.stack import Tally, eventually

K = LETTER_TEXT_KEPT


def fields() -> dict[str, Any]:
    return {
        "error": "poison",
        "source_topic": Topics.USAGE_INGEST,
        "partition": 0,
        "offset": 0,
        "failed_by": "usage-meter",
        "failed_at": datetime.now(UTC),
    }


def replayed(value: bytes) -> bytes | None:
    """What a replay sends for a letter of ``value``, written as ``dlq_row`` writes it."""
    body = DeadLetter.holding(value, **fields()).model_dump(mode="json", exclude_none=True)
    return DeadLetter.model_validate_json(dumps(body)).original()


# --- held: the exact bytes or None ----------------------------------------------------------


@settings(max_examples=2000, suppress_health_check=list(HealthCheck), deadline=None)
@given(
    st.binary(max_size=400)
    | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))
    | st.lists(
        st.sampled_from([b"\xff", b"\xe2\x82", b"\xef\xbb\xbf", b"\x00", b"\xed\xa0\x80", b"a", "é".encode()])
    ).map(b"".join)
)
def test_a_letter_replays_the_bytes_received_or_nothing(value: bytes) -> None:
    got = replayed(value)
    assert got is None or got == value


BOUNDARIES = {
    "K ascii": b"a" * K,
    "K + 1 ascii": b"a" * (K + 1),
    "K bytes not UTF-8": b"\xff" * K,
    "K + 1 bytes not UTF-8": b"\xff" * (K + 1),
    "a 2-byte character across K bytes": b"a" * (K - 1) + "é".encode(),
    "a 4-byte character across K bytes": b"a" * (K - 1) + "\U0001f600".encode(),
    "K 4-byte characters": "\U0001f600".encode() * K,
    "K + 1 4-byte characters": "\U0001f600".encode() * (K + 1),
    "half a character at byte K": b"a" * (K - 1) + b"\xc3",
    "half a character across K, then text": b"a" * (K - 1) + b"\xe2\x82x",
    "K real U+FFFD": "\ufffd".encode() * K,
    "K control characters": b"\x01" * K,
    "K - 1 control characters and 0xFF": b"\x01" * (K - 1) + b"\xff",
    "NUL": b'{"a":"\x00"}',
    "BOM": b'\xef\xbb\xbf{"a":1}',
    "an encoded surrogate": b'{"a":"\xed\xa0\x80"}',
}


@pytest.mark.parametrize("name", list(BOUNDARIES))
def test_boundaries_replay_the_bytes_or_nothing_and_letters_stay_below_1_mib(name: str) -> None:
    value = BOUNDARIES[name]
    record = SimpleNamespace(topic=Topics.USAGE_INGEST, partition=0, offset=0, key=b"k", value=value)
    _, _, letter, _, _ = dlq_row(record, "x" * 5000, service="usage-meter")
    assert len(letter) < 1024 * 1024
    got = DeadLetter.model_validate_json(letter).original()
    assert got is None or got == value
    # what a letter of up to K characters whose bytes are at most K holds, it replays
    if len(value) <= K:
        assert got == value


def test_a_letter_written_by_hand_cannot_hold_other_bytes_than_its_text_says() -> None:
    """Forged field combinations: exact text with base64 of other bytes; base64 whose text is
    the message but with a byte count of the text; padding variants."""
    text = '{"company_id":"a"}'
    other = base64.b64encode(b'{"company_id":"b"}').decode()
    for extra in (
        {"message_exact": True, "message_base64": other},  # exact wins: the text is sent
        {"message_exact": False, "message_base64": base64.b64encode(text.encode()).decode() + "=="},
        {"message_exact": None, "message_bytes": 3},
        {"message_exact": False, "message_bytes": len(text)},
    ):
        letter = DeadLetter.model_validate({**fields(), "message": text, **extra})
        assert letter.original() in (None, text.encode()), extra


# --- broke: dlq list's table ----------------------------------------------------------------


def test_dlq_list_prints_its_table_with_a_record_that_is_no_letter(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``read`` describes garbage (the first review) without ``failed_at``; the table reads it.
    Against a broker: ``tally dlq list usage.ingest`` with any non-letter record in the DLQ."""
    from tally_cli.__main__ import app

    garbage = SimpleNamespace(value=b"garbage", partition=0, offset=3, key=None)
    good = SimpleNamespace(
        value=dumps(DeadLetter.holding(b"{}", **fields()).model_dump(mode="json", exclude_none=True)),
        partition=0,
        offset=4,
        key=b"k",
    )

    async def read(topic: str, *, limit: int = 100) -> list[dict[str, Any]]:
        return [dlq._described(garbage), dlq._described(good)]

    monkeypatch.setattr(dlq, "read", read)
    try:
        app(["dlq", "list", Topics.USAGE_INGEST])
    except SystemExit as done:
        assert done.code in (0, None)
    assert "usage.ingest.dlq" in capsys.readouterr().out


# --- broke: a tombstone, and keys -------------------------------------------------------------


def test_a_tombstone_is_not_replayed_as_an_empty_message() -> None:
    """A record with a null value (a tombstone without a key on the compacted
    rebilling.settings, or one whose key is not UTF-8) is lettered as the message b"": the
    replay sends an empty value, not the null the consumer received."""
    record = SimpleNamespace(
        topic=Topics.REBILLING_SETTINGS, partition=0, offset=0, key=b"acc_\xff", value=None
    )
    _, _, letter, _, _ = dlq_row(record, "ValueError: not UTF-8", service="wallet")
    assert DeadLetter.model_validate_json(letter).original() is None


@pytest.mark.parametrize("key", [b"", b"company-\xff"], ids=["empty", "not-utf8"])
def test_a_replay_keeps_the_key_so_the_partition(key: bytes) -> None:
    """The replay sends the DLQ record's key, which ``dlq_row`` wrote: None for b"" (aiokafka
    then picks a partition at random), U+FFFD for bytes not UTF-8 (another murmur2 hash)."""
    record = SimpleNamespace(topic=Topics.USAGE_INGEST, partition=0, offset=0, key=key, value=b"x")
    _, dlq_key, _, _, _ = dlq_row(record, "poison", service="usage-meter")
    assert dlq_key == key
    assert dlq_key is not None and murmur2(dlq_key) == murmur2(key)


# --- broke: a replay reaches every group of the topic -----------------------------------------


@pytest.fixture
def replayer(tally: Tally, monkeypatch: pytest.MonkeyPatch) -> Tally:
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=tally.stack.bootstrap))
    return tally


async def raw_license_changes(tally: Tally, aid: str, want: int) -> list[Any]:
    """The records of rebilling.events naming ``aid`` in a ``license.changed``, as the broker
    holds them (bytes, key, partition, offset), once at least ``want`` are there."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=tally.stack.bootstrap, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = [
            TopicPartition(Topics.REBILLING_EVENTS, p)
            for p in sorted(consumer.partitions_for_topic(Topics.REBILLING_EVENTS) or ())
        ]

        async def found() -> list[Any] | None:
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            out: list[Any] = []
            while batch := await consumer.getmany(timeout_ms=500):
                for records in batch.values():
                    out += [
                        r
                        for r in records
                        if r.value and b'"license.changed"' in r.value and aid.encode() in r.value
                    ]
            return out if len(out) >= want else None

        return await eventually(found, what=f"{want} license.changed of {aid}")
    finally:
        await consumer.stop()


async def test_a_letter_of_another_group_is_not_replayed_over_newer_licenses(replayer: Tally) -> None:
    tally = replayer
    agency = await Reseller(tally).create()
    await agency.patch_wallet({"auto_recharge": False})
    r = await tally.http.post(
        tally.url("recharge", f"/v1/companies/{agency.cid}/payment-methods"),
        json={"payment_method": await new_card(tally, GOOD)},
        headers=agency.admin,
    )
    assert r.status_code == 201, r.text
    aid = await agency.account()
    url = tally.url("wallet", f"/v1/accounts/{aid}/service-status")

    async def status(reason: str) -> dict[str, Any] | None:
        r = await tally.http.get(url, headers=tally.auth("product"))
        return r.json() if r.status_code == 200 and r.json()["reason"] == reason else None

    await eventually(lambda: status("no_license"), what="no license")
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/companies/{agency.cid}/licenses"),
        json={"quantity": 2},
        headers=agency.admin,
    )
    assert r.status_code in (200, 201), r.text
    r = await tally.http.post(
        tally.url("rebilling", f"/v1/accounts/{aid}/licenses"), json={"quantity": 1}, headers=agency.admin
    )
    assert r.status_code == 201, r.text
    await eventually(lambda: status("ok"), what="the license in the wallet")

    changes = await raw_license_changes(tally, aid, 2)
    old = next(r for r in changes if orjson.loads(r.value)["data"]["account_assigned"] in (0, None))
    # the notifier's webhook consumer (another group) dead-lettered rebilling's own record
    _, key, letter, _, _ = dlq_row(old, "DataError: a webhook row refused", service="notifier")
    producer = AIOKafkaProducer(bootstrap_servers=tally.stack.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(Topics.dlq(Topics.REBILLING_EVENTS), letter, key=key)
    finally:
        await producer.stop()

    with pytest.raises(dlq.StateTopic):
        await dlq.replay(Topics.REBILLING_EVENTS)  # rebilling.events carries state
    assert (await dlq.replay(Topics.REBILLING_EVENTS, dry_run=True)).replayed >= 1
    await after_the_forgery(tally, agency.cid)
    rows = await tally.sql("wallet", "SELECT licenses FROM accounts WHERE account_id = $1", aid)
    got = (await tally.http.get(url, headers=tally.auth("product"))).json()
    assert got == {"allowed": True, "reason": "ok"}, (got, [r["licenses"] for r in rows])
