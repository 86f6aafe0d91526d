"""usage-meter reads usage events two ways (#20): msgspec takes the common body
(``IncomingUsage`` and ``usable``), pydantic (``UsageEvent``) everything else and says what is
wrong. Both must read a body the same: the same events, or the same 422. Generated bodies mix
valid values with every edge the rules have (ids' characters and lengths, a newline in an id,
quantities of every JSON type, times in every spelling the pattern allows and some it does
not, missing, extra and repeated keys, batch sizes), and each is read both ways."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally import events
from tally.errors import ApiError
from tally.events import IncomingUsage, UsageEvent, occurred_instant, usable
from tally_usage_meter.ingestion import parse_ingest_record, parse_ingest_records
from tally_usage_meter.schemas import _validated, parse_usage_body

ID_CHARS = "abcXYZ019_.:-"
ids = st.one_of(
    st.text(ID_CHARS, min_size=1, max_size=8),
    st.sampled_from(["", "a" * 64, "a" * 65, "a b", "a/b", "a\n", "a\nb", "\n", "é", "a\x00", "١"]),
    st.integers(0, 5),  # not a string
    st.none(),
)
services = st.one_of(
    st.sampled_from(["email", "sms", "x" * 64, "x" * 65, "", "é" * 64, "é" * 65, "a\nb"]),
    st.text(max_size=3),
    st.integers(0, 3),
)
quantities = st.one_of(
    st.sampled_from(["1", "2.5", "0", "-1", "1e3", " 3 ", "0.0000001", "١", "", "abc"]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)
times = st.one_of(
    st.builds(
        lambda y, mo, d, h, mi, s, frac, sep, zone: (
            f"{y}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}:{s:02d}{frac}{zone}"
        ),
        st.sampled_from([1899, 1900, 1999, 2026, 2099, 2100]),
        st.integers(1, 12),
        st.integers(1, 31),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 60),
        st.sampled_from(["", ".1", ".123456", ".1234567", ".999999999", ".9999995", "."]),
        st.sampled_from(["T", "t", " "]),
        st.sampled_from(["Z", "z", "+00:00", "-00:00", "+05:30", "-12:45", "+23:59", "+24:00", "", "+0530"]),
    ),
    st.sampled_from(
        ["", "now", "2026-12-03", "1733220000", "2026-12-03T10:00:00Z\n", "\n2026-12-03T10:00:00Z"]
    ),
    st.integers(0, 2),
    st.none(),
)
FIELDS = {
    "event_id": ids,
    "company_id": ids,
    "account_id": ids,
    "service": services,
    "quantity": quantities,
    "occurred_at": times,
    "extra": st.integers(0, 3),
}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # integers past 64 bits too, non-ASCII as is


@st.composite
def event_texts(draw: st.DrawFn) -> str:
    """One event object as JSON text: each field present or not (mostly present), with a value
    drawn valid or not; now and then a field written twice (the last one counts)."""
    parts = []
    for name, values in FIELDS.items():
        if draw(st.integers(0, 9)) == 0 and name not in ("extra", "account_id", "occurred_at"):
            continue  # missing
        if name in ("extra", "account_id", "occurred_at") and draw(st.booleans()):
            continue
        if draw(st.integers(0, 19)) == 0:  # repeated
            parts.append(f"{_json(name)}:{_json(draw(values))}")
        parts.append(f"{_json(name)}:{_json(draw(values))}")
    return "{" + ",".join(parts) + "}"


@st.composite
def valid_event_texts(draw: st.DrawFn) -> str:
    """A valid event, so that the fast way is taken often and compared."""
    event: dict[str, Any] = {
        "event_id": draw(st.text(ID_CHARS, min_size=1, max_size=64)),
        "company_id": draw(st.text(ID_CHARS, min_size=1, max_size=64)),
        "service": draw(st.text(min_size=1, max_size=64)),
        "quantity": draw(st.one_of(st.sampled_from(["1", "2.5", "0.000001"]), st.integers(1, 10**9))),
    }
    if draw(st.booleans()):
        event["account_id"] = draw(st.text(ID_CHARS, min_size=1, max_size=64))
    if draw(st.booleans()):
        event["occurred_at"] = draw(times)
    return orjson.dumps(event).decode()


one_event = st.one_of(valid_event_texts(), event_texts())
bodies = st.one_of(
    one_event,
    st.lists(one_event, min_size=0, max_size=6).map(lambda es: '{"events":[' + ",".join(es) + "]}"),
    st.lists(valid_event_texts(), min_size=1, max_size=6).map(lambda es: '{"events":[' + ",".join(es) + "]}"),
    st.sampled_from(["", "[]", "null", '{"events": null}', '{"events": {}}', "{", '{"events": []} x']),
)


def _same(event: IncomingUsage) -> tuple[Any, ...]:
    """An event as pricing reads it (the time as its instant, whatever its spelling)."""
    instant = None if event.occurred_at is None else occurred_instant(event.occurred_at)
    return (event.event_id, event.company_id, event.account_id, event.service, event.quantity, instant)


def _pydantic_way(raw: bytes) -> list[tuple[Any, ...]] | tuple[int, Any]:
    try:
        return [_same(IncomingUsage.of(e)) for e in _validated(raw)]
    except ApiError as exc:
        return (exc.status, exc.details)


def _both_ways(raw: bytes) -> list[tuple[Any, ...]] | tuple[int, Any]:
    try:
        return [_same(e) for e in parse_usage_body(raw)]
    except ApiError as exc:
        return (exc.status, exc.details)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_a_body_reads_the_same_both_ways(body: str) -> None:
    raw = body.encode()
    assert _both_ways(raw) == _pydantic_way(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(one_event, min_size=1, max_size=5))
def test_usage_ingest_records_read_the_same_both_ways(texts: list[str]) -> None:
    """A ``usage.ingest`` batch: each record's event, or a dead letter, as pydantic says."""
    values = [t.encode() for t in texts]
    expected: list[Any] = []
    for v in values:
        try:
            expected.append(_same(IncomingUsage.of(UsageEvent.model_validate_json(v))))
        except ValueError:
            expected.append("dead")
    got = [("dead" if isinstance(p, events.BadMessage) else _same(p)) for p in parse_ingest_records(values)]
    assert got == expected


def test_the_time_is_read_as_pydantic_reads_it() -> None:
    """Digits past the microsecond are cut, not rounded (msgspec's own datetime rounds)."""
    raw = (
        b'{"event_id":"e","company_id":"c","service":"s","quantity":"1",'
        b'"occurred_at":"2026-12-03t23:59:59.9999999z"}'
    )
    (event,) = parse_usage_body(raw)
    assert occurred_instant(event.occurred_at or "") == datetime.fromisoformat(
        "2026-12-03T23:59:59.999999+00:00"
    )
    assert occurred_instant(event.occurred_at or "") == UsageEvent.model_validate_json(raw).occurred_at


@pytest.mark.parametrize("day", ["2026-02-30", "2026-04-31", "1900-02-29", "2100-02-29"])
def test_a_day_no_calendar_has_is_a_422_not_a_crash(day: str) -> None:
    """The time pattern takes any day up to 31 in any month; found by the property test
    above: the fast way took "1900-02-29" and pricing then failed on it, for the whole batch."""
    body = f'{{"event_id":"e","company_id":"c","service":"s","quantity":"1","occurred_at":"{day}T10:00:00Z"}}'
    with pytest.raises(ApiError) as info:
        parse_usage_body(body.encode())
    assert info.value.status == 422
    with pytest.raises(events.BadMessage):
        parse_ingest_record(body.encode())


@pytest.mark.parametrize(
    "bad_id",
    ["a\nb", "a\n", "a" * 65, "", "a b", "é"],
)
def test_an_id_off_the_pattern_is_never_usable(bad_id: str) -> None:
    """``usable`` checks a whole batch's ids in one match; a newline in an id must not split it
    into two ids that pass."""
    good = IncomingUsage(event_id="e1", company_id="c1", service="s", quantity="1")
    for field in ("event_id", "company_id", "account_id"):
        bad = IncomingUsage(
            **{**{"event_id": "e2", "company_id": "c1", "service": "s", "quantity": "1"}, field: bad_id}
        )
        assert not usable([good, bad])
        assert not usable([bad])
    assert usable([good, good])


def test_a_usage_ingest_record_alone_is_read_as_in_a_batch() -> None:
    """A float quantity is no body error: the event is read (pricing refuses it, in its own
    words); a newline in an id is a dead letter."""
    assert (
        parse_ingest_record(b'{"event_id":"e","company_id":"c","service":"s","quantity":1.5}').quantity == 1.5
    )
    with pytest.raises(events.BadMessage):
        parse_ingest_record(b'{"event_id":"e\\nx","company_id":"c","service":"s","quantity":"1"}')
