"""Hypothesis-generated garbage on every consumed topic: each message lands in its topic's DLQ
with a reason, and every service keeps consuming (a valid message after it is applied)."""

from __future__ import annotations

import time

import orjson
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.events import Topics
from tests.support.builders import run_in_fresh_loop
from tests.support.stack import Tally, eventually, messages_containing, uid

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KNOWN_TYPES = {
    Topics.USAGE_INGEST: None,
    Topics.USAGE_RECORDED: "usage.recorded",
    Topics.WALLET_DIGEST: "wallet.threshold_crossed",
    Topics.RECHARGE_EVENTS: "recharge.succeeded",
    Topics.REBILLING_SETTINGS: "rebilling.settings",
    Topics.REBILLING_EVENTS: "account.created",
}


@st.composite
def garbage(draw: st.DrawFn) -> tuple[str, bytes]:
    """(marker, message): never a valid message for the topic's consumers."""
    marker = f"garbage-{draw(st.integers(0, 10**12))}-{time.monotonic_ns()}"
    kind = draw(st.sampled_from(["bytes", "not-object", "no-envelope", "bad-payload", "huge"]))
    if kind == "bytes":
        return marker, marker.encode() + draw(st.binary(max_size=200)) + b"\xff{"
    if kind == "not-object":
        return marker, orjson.dumps([marker, draw(json_values)])
    if kind == "no-envelope":
        return marker, orjson.dumps({"marker": marker, "data": draw(json_values)})
    if kind == "huge":
        return marker, orjson.dumps({"marker": marker, "pad": "x" * 400_000})
    data = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
    return marker, orjson.dumps(
        {
            "id": marker,
            "type": "{TYPE}",
            "time": "2026-01-01T00:00:00Z",
            "source": "fuzz",
            "data": {**data, "marker": marker, "company_id": [marker]},
        }
    )


async def produce_all(bootstrap: str, items: list[tuple[str, str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        for topic, key, value in items:
            await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


async def dlq_texts(bootstrap: str, topic: str) -> list[str]:
    """The original text of every dead letter on ``topic`` (checking each has a reason)."""
    texts: list[str] = []
    for value in await messages_containing(bootstrap, topic, b""):
        doc = orjson.loads(value)
        assert doc["error"] and doc["source_topic"] == topic.removesuffix(".dlq")
        texts.append(doc["message"])
    return texts


def test_garbage_on_every_topic_is_dead_lettered_and_consumption_goes_on(tally: Tally) -> None:
    sent: dict[str, set[str]] = {t: set() for t in KNOWN_TYPES}
    bootstrap = tally.stack.bootstrap

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(garbage(), min_size=2, max_size=4))
    def check(messages: list[tuple[str, bytes]]) -> None:
        items = []
        for topic, type_ in KNOWN_TYPES.items():
            for marker, value in messages:
                if b"{TYPE}" in value and type_ is None:
                    value = value.replace(b'"type":"{TYPE}",', b"")  # raw usage topic
                items.append((topic, uid("k"), value.replace(b"{TYPE}", (type_ or "").encode())))
                sent[topic].add(marker)
        run_in_fresh_loop(produce_all(bootstrap, items))

    check()
    assert all(sent.values())

    async def missing() -> dict[str, set[str]]:
        out = {}
        for topic, markers in sent.items():
            texts = await dlq_texts(bootstrap, Topics.dlq(topic))
            out[topic] = {m for m in markers if not any(m in t for t in texts)}
        return out

    deadline = time.monotonic() + 60
    while True:
        left = run_in_fresh_loop(missing())
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not any(left.values()), {t: sorted(m)[:3] for t, m in left.items() if m}


async def test_services_kept_consuming_after_the_garbage(tally: Tally) -> None:
    """Runs after the garbage test: a valid message on each topic is still applied."""
    cid, aid = uid("after-garbage-co"), uid("after-garbage-acct")
    now = "2026-01-01T00:00:00+00:00"
    await tally.produce(
        "usage.ingest",
        {"event_id": uid("ev"), "company_id": cid, "service": "email", "quantity": "1"},
        key=cid,
    )
    await tally.envelope(
        "rebilling.events", "account.created", {"account_id": aid, "company_id": cid, "name": "x"}, key=cid
    )
    await tally.envelope(
        "rebilling.settings",
        "rebilling.settings",
        {"account_id": aid, "company_id": cid, "mode": "rebill"},
        key=aid,
    )
    await tally.envelope(
        "recharge.events",
        "recharge.succeeded",
        {
            "wallet_id": f"company:{cid}",
            "owner": "company",
            "company_id": cid,
            "currency": "USD",
            "recharge_id": uid("rc"),
            "trigger": "manual",
            "amount_micros": 1_000_000,
        },
        key=cid,
    )
    crossing = uid("crossing")
    await tally.envelope(
        "wallet.digest",
        "wallet.threshold_crossed",
        {
            "wallet_id": f"company:{cid}",
            "owner": "company",
            "company_id": cid,
            "currency": "USD",
            "balance_micros": 0,
            "threshold_micros": 1,
            "reload_amount_micros": 1_000_000,
            "auto_recharge": True,
            "smart_adjustment": False,
        },
        key=cid,
        id_=crossing,
    )
    del now

    async def applied() -> bool:
        w = await tally.sql(
            "wallet",
            "SELECT (SELECT count(*) FROM transfers WHERE "
            "debit_wallet = $1 OR credit_wallet = $1) AS lines, "
            "(SELECT count(*) FROM accounts WHERE account_id = $2) AS accounts, "
            "(SELECT count(*) FROM rebilling_settings WHERE account_id = $2) AS s",
            f"company:{cid}",
            aid,
        )
        # the crossing was taken (the wallet has no card: the rule starts no recharge)
        r = await tally.sql(
            "recharge",
            "SELECT count(*) AS n FROM inbox WHERE consumer = 'recharge-wallet' AND message_id = $1",
            crossing,
        )
        row = w[0]
        return bool(row["lines"] >= 2 and row["accounts"] == 1 and row["s"] == 1 and r[0]["n"] >= 1)

    await eventually(applied, timeout=60, what="valid messages after the garbage")
