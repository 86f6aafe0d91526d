"""The AsyncAPI 3 document of Tally's topics and outbound webhooks, generated from the payload
models in ``tally.events`` (the one source of truth: what the consumers validate is what is
documented). Every service serves it at ``/asyncapi.json``; ``docs/asyncapi.json`` is the same
document, and a test fails when a model changes and that file does not
(``python -m tally.asyncapi > docs/asyncapi.json`` writes it again)."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tally import events
from tally.events import Topics

VERSION = "1"
REF = "#/components/schemas/{model}"


class Channel(BaseModel):
    topic: str
    key: str
    description: str
    types: tuple[str, ...]
    action: str = "send"  # Tally's side: it sends (publishes) or receives


def _channels() -> list[Channel]:
    digest = (*sorted(events.DIGEST_TYPES), "wallet.usage")
    return [
        Channel(
            topic=Topics.USAGE_INGEST,
            key="company_id",
            description="Raw usage events, as POST /v1/usage takes them; products may produce here.",
            types=("usage.ingest",),
            action="receive",
        ),
        Channel(
            topic=Topics.USAGE_RECORDED,
            key="company_id",
            description="Usage accepted by usage-meter, priced at the platform price.",
            types=("usage.recorded",),
        ),
        Channel(
            topic=Topics.WALLET_EVENTS,
            key="company_id",
            description=(
                "Every wallet event. wallet.debited is published per debit (one usage event: the "
                "company leg, and the account leg when the account is rebilled)."
            ),
            types=events.TOPIC_TYPES[Topics.WALLET_EVENTS],
        ),
        Channel(
            topic=Topics.WALLET_DIGEST,
            key="company_id",
            description=(
                "What the other services act on, at a fraction of wallet.events' volume: copies "
                "of its state changes (same envelope and id) and wallet.usage, each posted "
                "batch's usage summed by account, service and minute."
            ),
            types=digest,
        ),
        Channel(
            topic=Topics.RECHARGE_EVENTS,
            key="company_id",
            description="Recharges and saved cards.",
            types=events.TOPIC_TYPES[Topics.RECHARGE_EVENTS],
        ),
        Channel(
            topic=Topics.REBILLING_SETTINGS,
            key="account_id",
            description="Compacted: the full current rebilling settings of each account.",
            types=("rebilling.settings",),
        ),
        Channel(
            topic=Topics.REBILLING_EVENTS,
            key="company_id",
            description="Companies, accounts, subscriptions and licenses.",
            types=events.TOPIC_TYPES[Topics.REBILLING_EVENTS],
        ),
    ]


def _mid(type_: str) -> str:
    return type_.replace(".", "_")


def _summary(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].replace("\n", " ")


def _envelope(type_: str, payload_ref: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "type", "time", "source", "data"],
        "properties": {
            "id": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "unique; consumers dedupe on it",
            },
            "type": {"const": type_},
            "time": {"type": "string", "format": "date-time"},
            "source": {"type": "string", "description": "the service that published it"},
            "data": {"$ref": payload_ref},
        },
    }


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once per process)."""
    models: list[type[BaseModel]] = sorted(
        {*events.PAYLOADS.values(), events.DeadLetter}, key=lambda m: m.__name__
    )
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = dict(sorted(defs.get("$defs", {}).items()))
    messages: dict[str, Any] = {}
    traceparent = {
        "type": "object",
        "properties": {"traceparent": {"type": "string", "description": "W3C trace context"}},
    }

    def message(type_: str, key: str) -> dict[str, Any]:
        model = events.PAYLOADS[type_]
        envelope_name = f"{model.__name__}Envelope_{_mid(type_)}"
        schemas[envelope_name] = _envelope(type_, REF.format(model=model.__name__))
        return {
            "name": type_,
            "title": type_,
            "summary": _summary(model) or type_,
            "contentType": "application/json",
            "headers": traceparent,
            "payload": {"$ref": REF.format(model=envelope_name)},
            "bindings": {"kafka": {"key": {"type": "string", "description": key}}},
        }

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for ch in _channels():
        cid = _mid(ch.topic)
        refs = {}
        for t in ch.types:
            messages.setdefault(_mid(t), message(t, ch.key))
            refs[_mid(t)] = {"$ref": f"#/components/messages/{_mid(t)}"}
        channels[cid] = {"address": ch.topic, "description": ch.description, "messages": refs}
        operations[f"{ch.action}_{cid}"] = {
            "action": ch.action,
            "channel": {"$ref": f"#/channels/{cid}"},
            "messages": [{"$ref": f"#/channels/{cid}/messages/{m}"} for m in refs],
        }
    messages["dead_letter"] = {
        "name": "dead_letter",
        "title": "A message that could not be applied",
        "summary": _summary(events.DeadLetter),
        "contentType": "application/json",
        "payload": {"$ref": REF.format(model="DeadLetter")},
    }
    channels["dlq"] = {
        "address": "{topic}.dlq",
        "description": "Each topic's dead-letter queue (keyed as the source).",
        "parameters": {
            "topic": {"description": "the source topic", "enum": sorted(c.topic for c in _channels())}
        },
        "messages": {"dead_letter": {"$ref": "#/components/messages/dead_letter"}},
    }
    operations["send_dlq"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/dlq"},
        "messages": [{"$ref": "#/channels/dlq/messages/dead_letter"}],
    }
    # outbound webhooks: the same envelopes, POSTed to a company's endpoints
    hook_refs = {}
    for t in events.WEBHOOK_TYPES:
        messages.setdefault(_mid(t), message(t, "company_id"))
        hook_refs[_mid(t)] = {"$ref": f"#/components/messages/{_mid(t)}"}
    channels["webhooks"] = {
        "address": "{endpoint_url}",
        "description": (
            "Outbound webhooks (Standard Webhooks): each event of a company, POSTed to its "
            "endpoints whose event_types match, with the headers webhook-id (the event id, "
            "the same on every retry), webhook-timestamp and webhook-signature "
            "(v1,<base64 HMAC-SHA256 of id.timestamp.body with the endpoint's whsec_ secret>)."
        ),
        "parameters": {"endpoint_url": {"description": "the URL registered for the endpoint"}},
        "messages": hook_refs,
        "bindings": {"http": {"method": "POST"}},
    }
    operations["send_webhooks"] = {
        "action": "send",
        "channel": {"$ref": "#/channels/webhooks"},
        "messages": [{"$ref": f"#/channels/webhooks/messages/{m}"} for m in hook_refs],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Tally events",
            "version": VERSION,
            "description": (
                "Tally's Kafka topics and outbound webhooks. Every value is a JSON envelope "
                '{"id", "type", "time", "source", "data"}; amounts are integer micros.'
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "kafka": {
                "host": "127.0.0.1:9092",
                "protocol": "kafka",
                "description": "KAFKA_BOOTSTRAP_SERVERS",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": dict(sorted(messages.items())), "schemas": dict(sorted(schemas.items()))},
    }


@functools.cache
def dumps() -> bytes:
    return orjson.dumps(document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(dumps())
