"""Dead letters as ``tally.consumer.dlq_row`` writes them and ``tally dlq`` reads them, without a
broker: a letter gives a replay the bytes the consumer received, or nothing (hypothesis over
arbitrary bytes, and the 100,000 boundaries), stays below 1 MiB, keeps its record's key byte
for byte, holds no bytes for a tombstone; ``tally dlq list``'s table reads records that are no
letter. From the last review of the change that made replays exact (docs/0023); the broker
side is tests/integration/test_dlq_replay_attacks.py and tests/e2e/test_dlq_*_attacks.py."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.partitioner import murmur2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.consumer import dlq_row
from tally.events import LETTER_TEXT_KEPT, DeadLetter, Topics, dumps
from tally_cli import dlq

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


# --- mended: dlq list's table ----------------------------------------------------------------


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


# --- mended: a tombstone, and keys -------------------------------------------------------------


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


def test_a_letter_from_before_message_bytes_replays_its_text() -> None:
    """Letters written before 2026-12-05 carry neither ``message_bytes`` nor
    ``message_base64``: their text is what a replay sends, as before."""
    old = DeadLetter.model_validate_json(
        b'{"error":"e","source_topic":"t","partition":0,"offset":1,"failed_by":"wallet",'
        b'"failed_at":"2026-12-01T00:00:00Z","message":"{\\"a\\": 1}"}'
    )
    assert old.original() == b'{"a": 1}'
