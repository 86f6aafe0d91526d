"""Attacks on usage-meter's msgspec hot path (docs/0022) from the public API: POST /v1/usage and
the ``usage.ingest`` topic. The contract (API.md): a body is taken exactly as before the fast
way, or refused exactly as before. The unit side is tests/unit/test_incoming_attacks.py. Real
stack.

A helper found these against the first version of the change, and each is mended:
- bytes that are not UTF-8 in a field nobody reads were accepted and charged, over HTTP and
  on ``usage.ingest`` (a 422 or a dead letter before and now);
- an integer of more than 4,300 digits in a field nobody reads was accepted;
- a value nested ~3000 deep (6 kB) made POST /v1/usage answer 500; on ``usage.ingest`` the
  batch failed with RecursionError, which ``tally.consumer`` retries for ever: the partition
  stopped and the usage behind it was never charged. That test is last in the file: were it
  to fail again, that partition of usage.ingest would stay stuck for the rest of the session.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tally.settings import Settings
from tally_cli import dlq
from tests.support.builders import funded
from tests.support.stack import Tally, eventually, uid


def event(cid: str, eid: str, **kw: Any) -> dict[str, Any]:
    return {"event_id": eid, "company_id": cid, "service": "email", "quantity": "1", **kw}


def with_extra(e: dict[str, Any], extra: bytes) -> bytes:
    return orjson.dumps(e)[:-1] + b',"x":' + extra + b"}"


async def post_raw(tally: Tally, raw: bytes) -> Any:
    return await tally.http.post(
        tally.url("usage-meter", "/v1/usage"),
        content=raw,
        headers={**tally.auth("product"), "content-type": "application/json"},
    )


async def charged(tally: Tally, cid: str, eid: str) -> list[dict[str, Any]]:
    return [t for t in await tally.company_transactions(cid) if t["usage_event_id"] == eid]


async def after_sentinel(tally: Tally, cid: str, *, via_topic: bool = False, timeout: float = 30) -> None:
    """A later good event of the company in the ledger: anything sent before it was applied."""
    e = event(cid, uid("sentinel"))
    if via_topic:
        await tally.produce("usage.ingest", e, key=cid)
    else:
        r = await tally.post_usage(e)
        assert r.json()["results"][0]["status"] == "accepted", r.text
    await tally.wait_applied(cid, e["event_id"], timeout=timeout)


async def test_held_resend_is_duplicate_and_charged_once(tally: Tally) -> None:
    """the same event sent again (alone, in a batch twice, and on the topic) is
    ``duplicate``; the ledger has it once."""
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    first = await tally.post_usage(e)
    assert first.json()["results"][0]["status"] == "accepted", first.text
    again = await tally.post_usage({"events": [e, e]})
    assert [r["status"] for r in again.json()["results"]] == ["duplicate", "duplicate"], again.text
    await tally.produce("usage.ingest", e, key=cid)
    await after_sentinel(tally, cid, via_topic=True)
    assert len(await charged(tally, cid, e["event_id"])) == 1


async def test_http_bytes_not_utf8_in_an_unknown_field_are_a_422(tally: Tally) -> None:
    """A body that is not UTF-8 JSON is a 422 (API.md), even where the bytes are in a field
    nobody reads (the first fast way took it: 202, and charged)."""
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    r = await post_raw(tally, with_extra(e, b'"\xff"'))
    assert r.status_code == 422, r.text
    await after_sentinel(tally, cid)
    assert await charged(tally, cid, e["event_id"]) == []


async def test_http_an_integer_past_4300_digits_in_an_unknown_field_is_a_422(tally: Tally) -> None:
    """A 422 (a number out of range), as before the fast way (the first version took it)."""
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    r = await post_raw(tally, with_extra(e, b"1" * 4301))
    assert r.status_code == 422, r.text


async def test_http_deep_nesting_is_a_422_not_a_500(tally: Tally) -> None:
    """A 422 "body is not valid JSON: depth limit exceeded", not a 500 (msgspec raises
    RecursionError, which the first fast way did not catch)."""
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    r = await post_raw(tally, with_extra(e, b"[" * 3000 + b"]" * 3000))
    assert r.status_code == 422, r.text


async def test_ingest_bytes_not_utf8_in_an_unknown_field_are_a_dead_letter(tally: Tally) -> None:
    """Dead-lettered ("not a usage event: ... invalid unicode code point") and never charged
    (the first fast way took it and charged it)."""
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    await tally.produce("usage.ingest", with_extra(e, b'"\xff"'), key=cid)
    await after_sentinel(tally, cid, via_topic=True)
    assert await charged(tally, cid, e["event_id"]) == []
    await tally.find_on_topic("usage.ingest.dlq", lambda m: e["event_id"] in m.get("message", ""))


async def test_a_replayed_letter_of_bytes_not_utf8_is_dead_lettered_again_never_charged(
    tally: Tally, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tally dlq replay`` sends the bytes that failed. It sent the letter's text, where the
    byte that is not UTF-8 had become U+FFFD: a valid event, charged on replay."""
    monkeypatch.setattr(dlq, "get_settings", lambda: Settings(KAFKA_BOOTSTRAP_SERVERS=tally.stack.bootstrap))
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    await tally.produce("usage.ingest", with_extra(e, b'"\xff"'), key=cid)

    async def letters(n: int) -> bool:
        found = [x for x in await dlq.read("usage.ingest", limit=10_000) if e["event_id"] in x["message"]]
        return len(found) == n

    await eventually(lambda: letters(1), what="the letter")
    assert (await dlq.replay("usage.ingest")).replayed >= 1
    await eventually(lambda: letters(2), what="the replayed record dead-lettered again")
    await after_sentinel(tally, cid, via_topic=True)
    assert await charged(tally, cid, e["event_id"]) == []


async def test_ingest_deep_nesting_is_a_dead_letter_and_the_partition_goes_on(tally: Tally) -> None:
    """The record is dead-lettered and the good event behind it charged. With the first fast
    way the batch raised RecursionError on every delivery (a RuntimeError, not an error
    ``tally.consumer`` blames on a record): no dead letter, and the partition stopped. LAST in
    the file on purpose."""
    cid = await funded(tally)
    e = event(cid, uid("ev"))
    await tally.produce("usage.ingest", with_extra(e, b"[" * 3000 + b"]" * 3000), key=cid)
    await after_sentinel(tally, cid, via_topic=True, timeout=45)
    await tally.find_on_topic("usage.ingest.dlq", lambda m: e["event_id"] in m.get("message", ""))
    assert await charged(tally, cid, e["event_id"]) == []
