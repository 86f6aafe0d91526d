"""Structured logs (one JSON object per line), OpenTelemetry tracing, trace context helpers.

Tracing exports over OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific
variable) is set; otherwise spans are still created so that ``traceparent`` propagates through
Kafka headers, but nothing is exported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from prometheus_client import Histogram

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_provider: TracerProvider | None = None
_exporting = False


def setup_tracing(service: str) -> TracerProvider:
    """One tracer provider per process. Spans are exported over OTLP/HTTP when the standard
    ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set, and as JSON lines to
    ``$TALLY_TRACES_DIR/<service>.jsonl`` when that is set (tests, debugging)."""
    global _provider, _exporting
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": f"tally-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _exporting = True
    folder = os.environ.get("TALLY_TRACES_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = open(Path(folder) / f"{service}.jsonl", "a", buffering=1)
        provider.add_span_processor(
            SimpleSpanProcessor(
                ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
            )
        )
        _exporting = True
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def tracing_enabled() -> bool:
    """Whether spans go anywhere. When they do not, per-event spans are skipped entirely and
    trace context is only passed through (tracing off costs nothing)."""
    return _exporting


@contextlib.contextmanager
def continue_trace(
    traceparent: str | None, name: str, attributes: dict[str, Any] | None = None
) -> Iterator[str | None]:
    """Continue the trace of an incoming message: with tracing on, a child span of
    ``traceparent``; yields the traceparent to give to what this work produces (outbox rows)."""
    if not _exporting:
        yield traceparent
        return
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    tracer = trace.get_tracer("tally")
    with tracer.start_as_current_span(name, context=parent, attributes=attributes or {}):
        yield current_traceparent()


def child_traceparent(
    traceparent: str | None, name: str, attributes: dict[str, Any] | None = None
) -> str | None:
    """For per-event work inside a batch: with tracing on, record a span of ``name`` under
    ``traceparent`` and return its own traceparent; off, return ``traceparent`` unchanged."""
    if not _exporting:
        return traceparent
    with continue_trace(traceparent, name, attributes) as child:
        return child


# W3C trace context: version, trace id, parent id, flags (a later version may add fields)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[!-~]*)?")


def header(record: Any, name: str = "traceparent") -> str | None:
    """A header of a Kafka record, decoded (None when absent). A ``traceparent`` that is not
    one (a NUL byte in it could not even be stored in a text column) is treated as absent."""
    for key, value in record.headers or ():
        if key == name and value:
            text = bytes(value).decode("ascii", errors="replace")
            if name == "traceparent" and not _TRACEPARENT.fullmatch(text):
                return None
            return text
    return None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, for headers written later (outbox)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """``count`` observations of one ``value``, at the cost of one. prometheus_client has no
    such call: this is its ``Histogram.observe`` (0.26, pinned) with the bucket raised by
    ``count`` instead of 1; a unit test holds the two equal. The wallet observes each debit's
    latency, and the debits of a batch share a few values (one per usage-meter group)."""
    histogram._sum.inc(value * count)
    for i, bound in enumerate(histogram._upper_bounds):
        if value <= bound:
            histogram._buckets[i].inc(count)
            break
