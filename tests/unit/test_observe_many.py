"""``observe_many`` is prometheus_client's ``Histogram.observe`` repeated, in one call."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from tally.telemetry import observe_many

BUCKETS = (0.01, 0.1, 1.0)


def samples(h: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for m in h.collect()
        for s in m.samples
        if "created" not in s.name
    }


@pytest.mark.parametrize("value", [0.0, 0.01, 0.05, 1.0, 7.5])
def test_observing_many_is_observing_each(value: float) -> None:
    each = Histogram("each", "", buckets=BUCKETS, registry=CollectorRegistry())
    many = Histogram("many", "", buckets=BUCKETS, registry=CollectorRegistry())
    for _ in range(3):
        each.observe(value)
    each.observe(0.5)
    observe_many(many, value, 3)
    observe_many(many, 0.5, 1)
    got = {(name.replace("many", "each"), le): v for (name, le), v in samples(many).items()}
    assert got == samples(each)
    assert samples(each)[("each_count", "")] == 4
