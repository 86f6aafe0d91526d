"""The packed outbox format and the consumers' type filter, without I/O."""

from __future__ import annotations

from types import SimpleNamespace

import lz4.frame
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally import events, outbox
from tally.consumer import take, wanted
from tests.support.outbox_layouts import length_prefixed

rows = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=40),
        st.none() | st.binary(max_size=60),
        st.binary(max_size=2000),
        st.none() | st.text(min_size=1, max_size=60),
        st.none() | st.text(min_size=1, max_size=40),
    ),
    max_size=30,
)


@given(rows)
def test_pack_then_unpack_gives_back_every_message_in_order(messages: list[outbox.Row]) -> None:
    assert outbox.unpack(outbox.pack(messages)) == messages


@given(rows)
def test_rows_packed_by_the_previous_version_are_still_read(messages: list[outbox.Row]) -> None:
    """A relay upgraded with rows of the old layout still waiting sends them as they were."""
    old = length_prefixed(messages)
    row: dict[str, object] = {"rows_mp": None, "rows_mp_lz4": None, "messages": old, "messages_lz4": None}
    assert outbox.stored(row) == messages
    row.update(messages=None, messages_lz4=lz4.frame.compress(old))
    assert outbox.stored(row) == messages
    new: dict[str, object] = {**row, "messages_lz4": None, "rows_mp": outbox.pack(messages)}
    assert outbox.stored(new) == messages


def test_row_takes_the_type_from_the_envelope() -> None:
    message = {
        "id": "x",
        "type": "wallet.suspended",
        "time": "2026-01-01T00:00:00Z",
        "source": "t",
        "data": {},
    }
    topic, key, value, traceparent, type_ = outbox.row("wallet.events", "c1", message, "tp")
    assert (topic, key, traceparent, type_) == ("wallet.events", b"c1", "tp", "wallet.suspended")
    assert orjson.loads(value) == message
    assert outbox.row("t", None, b"raw", "tp")[4] is None


SUSPENDED = {
    "id": "wallet.suspended:k",
    "type": "wallet.suspended",
    "time": "2026-01-01T00:00:00Z",
    "source": "wallet",
    "data": {
        "wallet_id": "company:c1",
        "owner": "company",
        "company_id": "c1",
        "currency": "USD",
        "balance_micros": -1,
    },
}


def record(value: bytes, type_: str | None = None) -> SimpleNamespace:
    headers = [("traceparent", b"00-x")] + ([("type", type_.encode())] if type_ else [])
    return SimpleNamespace(
        value=value, headers=headers, topic="wallet.events", partition=0, offset=7, key=b"c1"
    )


def test_a_wanted_record_is_parsed_into_its_typed_payload() -> None:
    for r in (record(orjson.dumps(SUSPENDED), "wallet.suspended"), record(orjson.dumps(SUSPENDED))):
        message = wanted(r, ("wallet.suspended",))
        assert message is not None and isinstance(message.data, events.WalletSuspended)
        assert message.data.balance_micros == -1


def test_a_null_type_header_is_no_header() -> None:
    # Kafka allows a header without a value: the envelope tells the type (it raised TypeError,
    # which the consumer took for poison)
    r = record(orjson.dumps(SUSPENDED))
    r.headers.append(("type", None))
    message = wanted(r, ("wallet.suspended",))
    assert message is not None and message.type == "wallet.suspended"


def test_other_types_are_skipped_by_header_without_reading_the_value() -> None:
    assert wanted(record(b"\xff not json", "wallet.debited"), ("wallet.suspended",)) is None


def test_other_and_unknown_types_without_header_are_skipped() -> None:
    other = {**SUSPENDED, "type": "wallet.reactivated"}
    assert wanted(record(orjson.dumps(other)), ("wallet.suspended",)) is None
    unknown = {**SUSPENDED, "type": "wallet.renamed"}
    assert wanted(record(orjson.dumps(unknown)), ("wallet.suspended",)) is None


def test_a_broken_wanted_record_or_envelope_is_a_bad_message() -> None:
    bad = {**SUSPENDED, "data": {"wallet_id": "company:c1"}}
    with pytest.raises(events.BadMessage, match="company_id"):
        wanted(record(orjson.dumps(bad), "wallet.suspended"), ("wallet.suspended",))
    with pytest.raises(events.BadMessage):
        wanted(record(b"{not json"), ("wallet.suspended",))
    with pytest.raises(events.BadMessage):
        wanted(record(orjson.dumps({"type": "nope"})), ("wallet.suspended",))


def test_take_sorts_a_batch_into_wanted_messages_and_dead_letters() -> None:
    good = record(orjson.dumps(SUSPENDED), "wallet.suspended")
    other = record(b"ignored", "wallet.debited")
    broken = record(b"{not json")
    taken, dead = take([good, other, broken], ("wallet.suspended",), service="test")
    assert [(r, m.id) for r, m in taken] == [(good, "wallet.suspended:k")]
    assert [row[0] for row in dead] == ["wallet.events.dlq"]
    assert orjson.loads(dead[0][2])["message"] == "{not json"
