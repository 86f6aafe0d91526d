"""Attacks on usage-meter's msgspec hot path (docs/0022): bodies and ``usage.ingest`` records
that the pydantic way (``schemas._validated``, ``UsageEvent.model_validate_json``) refuses,
and that the fast way must refuse the same way. A helper found each against the first version
of the change, where they broke as follows, and each is mended (unknown fields make msgspec
refuse the event, and its ``RecursionError`` sends the input the pydantic way):

- a value nested ~1000 deep: msgspec raised ``RecursionError`` (not a ``DecodeError``), so
  POST /v1/usage answered 500 instead of 422, and a ``usage.ingest`` batch holding such a
  record raised an error ``tally.consumer`` does not blame on a record: the batch was
  redelivered for ever, its partition stopped and nothing was dead-lettered;
- bytes that are not UTF-8 in a field nobody reads (msgspec skipped unknown fields without
  checking them): refused before (422 / dead letter), then accepted and charged;
- an integer of more than 4,300 digits in a field nobody reads: likewise;
- (``usage.ingest`` only) a value nested 201 to ~900 deep in a field nobody reads: a dead
  letter before (pydantic's parser stops at depth 200), then accepted and charged.

The rest (``test_held``) read the same both ways on the first version too, and are kept as
guards."""

from __future__ import annotations

from typing import Any

import pytest

from tally import events
from tally.consumer import caused_by_the_record
from tally.errors import ApiError
from tally.events import IncomingUsage, UsageEvent, occurred_instant
from tally_usage_meter.ingestion import parse_ingest_record, parse_ingest_records
from tally_usage_meter.schemas import _validated, parse_usage_body

BASE = b'{"event_id":"e1","company_id":"c1","service":"email","quantity":"1"'


def with_extra(value: bytes) -> bytes:
    return BASE + b',"x":' + value + b"}"


def _same(event: IncomingUsage) -> tuple[Any, ...]:
    instant = None if event.occurred_at is None else occurred_instant(event.occurred_at)
    return (event.event_id, event.company_id, event.account_id, event.service, event.quantity, instant)


def http_old(raw: bytes) -> Any:
    try:
        return [_same(IncomingUsage.of(e)) for e in _validated(raw)]
    except ApiError as exc:
        return exc.status


def http_new(raw: bytes) -> Any:
    try:
        return [_same(e) for e in parse_usage_body(raw)]
    except ApiError as exc:
        return exc.status
    except Exception as exc:  # what the edge answers 500 for
        return f"500 ({type(exc).__name__})"


def ingest_old(raw: bytes) -> Any:
    try:
        return _same(IncomingUsage.of(UsageEvent.model_validate_json(raw)))
    except ValueError:
        return "dead letter"


def ingest_new(raw: bytes) -> Any:
    try:
        return _same(parse_ingest_record(raw))
    except events.BadMessage:
        return "dead letter"
    except Exception as exc:
        return f"batch fails ({type(exc).__name__})"


DEEP = b"[" * 3000 + b"]" * 3000
NOT_UTF8 = [b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'{"\xff":1}']
HUGE_INT = b"1" * 4301


@pytest.mark.parametrize(
    "raw", [with_extra(DEEP), BASE[:-3] + DEEP + b"}", b'{"x":' + DEEP + b"," + BASE[1:] + b"}"]
)
def test_deep_nesting_is_a_422_not_a_500(raw: bytes) -> None:
    """msgspec's RecursionError must not escape parse_usage_body (POST /v1/usage would answer 500)."""
    assert http_old(raw) == 422
    assert http_new(raw) == 422


def test_deep_nesting_is_a_dead_letter_not_a_stuck_partition() -> None:
    """A RecursionError for the whole batch is no error ``tally.consumer`` blames on a record:
    the batch would be redelivered for ever. Only the deep record is a dead letter."""
    good = BASE + b"}"
    bad = with_extra(DEEP)
    assert ingest_old(bad) == "dead letter"
    try:
        parsed = parse_ingest_records([good, bad, good])
    except Exception as exc:
        assert caused_by_the_record(exc), f"{exc!r} is retried forever: the partition stops"
        raise
    assert isinstance(parsed[0], IncomingUsage) and isinstance(parsed[2], IncomingUsage)
    assert isinstance(parsed[1], events.BadMessage)


@pytest.mark.parametrize("extra", NOT_UTF8, ids=["ff", "surrogate", "overlong", "key"])
def test_bytes_not_utf8_in_an_unknown_field_are_refused(extra: bytes) -> None:
    """msgspec skips an unknown field without checking its bytes; the body is a 422 and the
    record a dead letter, as before the fast way."""
    raw = with_extra(extra)
    assert http_old(raw) == 422 and ingest_old(raw) == "dead letter"
    assert http_new(raw) == 422
    assert ingest_new(raw) == "dead letter"


def test_bytes_not_utf8_in_an_unknown_key_are_refused() -> None:
    raw = BASE + b',"\xff":1}'
    assert http_old(raw) == 422 and ingest_old(raw) == "dead letter"
    assert http_new(raw) == 422
    assert ingest_new(raw) == "dead letter"


def test_an_integer_past_4300_digits_in_an_unknown_field_is_refused() -> None:
    """Refused (pydantic: number out of range; orjson: infinity), as before the fast way."""
    raw = with_extra(HUGE_INT)
    assert http_old(raw) == 422 and ingest_old(raw) == "dead letter"
    assert http_new(raw) == 422
    assert ingest_new(raw) == "dead letter"


@pytest.mark.parametrize("depth", [201, 300, 800])
def test_usage_ingest_nesting_past_200_reads_as_before(depth: int) -> None:
    """A record nested past pydantic's depth limit in a field nobody reads is a dead letter on
    ``usage.ingest``, as before (POST /v1/usage took it before too, through orjson)."""
    raw = with_extra(b"[" * depth + b"]" * depth)
    assert http_new(raw) == http_old(raw)
    assert ingest_new(raw) == ingest_old(raw)


# --- what held (kept as regression guards) -------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"\xef\xbb\xbf" + BASE + b"}",  # BOM
        b" \n\t\r" + BASE + b"} \n",  # JSON whitespace
        b"\xc2\xa0" + BASE + b"}",  # NBSP is no JSON whitespace
        BASE + b"}\x00",
        b'{"event_id":"bad id","event_id":"e1","company_id":"c1","service":"email","quantity":"1"}',
        b'{"event_id":"e1","event_id":"bad id","company_id":"c1","service":"email","quantity":"1"}',
        b'{"event_id":"e1","company_id":"c1","service":"email","quantity":1000,"quantity":"1"}',
        BASE + b',"occurred_at":"2026-02-30T10:00:00Z","occurred_at":"2026-12-03T10:00:00Z"}',
        BASE + b',"occurred_at":"2026-12-03T10:00:00Z","occurred_at":"junk"}',
        BASE + b',"account_id":"a1","account_id":null}',
        b'{"event_id":"e1\n","company_id":"c1","service":"email","quantity":"1"}',
        b'{"event_id":"e\\u000a1","company_id":"c1","service":"email","quantity":"1"}',
        '{"event_id":"\u212a","company_id":"c1","service":"email","quantity":"1"}'.encode(),
        '{"event_id":"e1","company_id":"c1","service":"email","quantity":"1","x":"\U0001f600"}'.encode(),
        b'{"event_id":"e1","company_id":"c1","service":"\\ud800","quantity":"1"}',
        BASE + b',"x":"\\q"}',
        BASE[:-3] + b"1" + b"0" * 400 + b"}",
        BASE[:-3] + b"18446744073709551616}",
        BASE[:-3] + b"-0}",
        BASE + b',"x":1e999}',
        BASE + b',"occurred_at":"2026-12-03T23:59:59.9999999-00:01"}',
        BASE + b',"occurred_at":"2099-12-31T23:59:59-23:59"}',
        BASE + b',"occurred_at":"1900-01-01T00:00:00+23:59"}',
        BASE + b',"occurred_at":"2026-12-03t10:00:00.000000001z"}',
        b'{"events":[],"events":[' + BASE + b"}]}",
        b'{"events":[' + BASE + b'}],"events":[]}',
    ],
)
def test_held(raw: bytes) -> None:
    assert http_new(raw) == http_old(raw)
    assert ingest_new(raw) == ingest_old(raw)
