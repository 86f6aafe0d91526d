"""The AsyncAPI document (``tally.asyncapi``): generated from the payload models, so it cannot
drift from what consumers validate — and ``docs/asyncapi.json`` must be that document (this
test fails when a model changes and the file does not: ``make asyncapi`` writes it again).
Every public type of every topic has a message whose schema accepts a real envelope of that
type and refuses a broken one; every ``$ref`` resolves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from tally import asyncapi, events
from tally.events import Topics

DOC = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.json"


def test_the_committed_document_is_the_generated_one() -> None:
    assert DOC.read_bytes() == asyncapi.dumps(), "docs/asyncapi.json is stale: run `make asyncapi`"


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves() -> None:
    doc = asyncapi.document()
    for ref in refs(doc):
        assert ref.startswith("#/"), ref
        resolve(doc, ref)


def test_every_topic_and_public_type_is_described() -> None:
    doc = asyncapi.document()
    addresses = {c["address"] for c in doc["channels"].values()}
    assert set(Topics.ALL) <= addresses
    for topic, types in events.TOPIC_TYPES.items():
        [channel] = [c for c in doc["channels"].values() if c["address"] == topic]
        names = {resolve(doc, m["$ref"])["name"] for m in channel["messages"].values()}
        assert names == set(types), topic
    hooks = doc["channels"]["webhooks"]["messages"]
    assert len(hooks) == len(events.WEBHOOK_TYPES)


def validator(type_: str) -> jsonschema.Draft202012Validator:
    doc = asyncapi.document()
    payload = doc["components"]["messages"][type_.replace(".", "_")]["payload"]
    schema = {**payload, "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


EXAMPLES: dict[str, events.Payload] = {
    "wallet.credited": events.WalletCredited(
        wallet_id="w1",
        owner="company",
        company_id="c1",
        currency="USD",
        transfer_id="t1",
        kind="manual_credit",
        amount_micros=1,
        balance_micros=1,
    ),
    "credit_request.created": events.CreditRequestCreated(
        request_id="r1", company_id="c1", account_id="a1", amount_micros=5, currency="EUR"
    ),
    "usage_alert.triggered": events.UsageAlertTriggered(
        company_id="c1",
        account_id="a1",
        day="2026-12-03",
        currency="USD",
        periods=["daily"],
        threshold_micros=1,
        usage_micros=2,
    ),
}


@pytest.mark.parametrize("type_", sorted(EXAMPLES))
def test_a_real_envelope_is_valid_and_a_broken_one_is_not(type_: str) -> None:
    envelope = orjson.loads(orjson.dumps(events.envelope(type_, EXAMPLES[type_], source="test")))
    check = validator(type_)
    check.validate(envelope)
    wrong_type = {**envelope, "type": "something.else"}
    no_company = {**envelope, "data": {k: v for k, v in envelope["data"].items() if k != "company_id"}}
    money_as_text = {**envelope, "data": {**envelope["data"], "company_id": 5}}
    for broken in (wrong_type, no_company, money_as_text):
        assert list(check.iter_errors(broken)), broken


def test_dead_letters_are_the_documented_shape() -> None:
    class Record:
        topic, partition, offset, key, value = "wallet.events", 1, 7, b"c1", b"{"

    from tally.consumer import dlq_row

    topic, _, value, _, _ = dlq_row(Record(), "bad", service="test")
    assert topic == "wallet.events.dlq"
    doc = asyncapi.document()
    schema = {"$ref": "#/components/schemas/DeadLetter", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(orjson.loads(value))
