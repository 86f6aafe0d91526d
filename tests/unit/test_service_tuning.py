"""Process tuning every service applies at start (``tally.service``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tally.service import tune_gc
from tally.settings import Settings


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_the_collector_runs_less_often_and_skips_what_start_up_built(restored_gc: None) -> None:
    before = gc.get_threshold()
    tune_gc(Settings(TALLY_GC_GEN0_THRESHOLD=12_345).gc_gen0_threshold)
    assert gc.get_threshold() == (12_345, before[1], before[2])
    assert gc.get_freeze_count() > 0
