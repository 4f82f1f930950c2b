"""The worker and API processes run with fewer, cheaper garbage collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from parley import cli


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_tune_gc_sets_the_threshold(restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)  # CPython's default
    cli.tune_gc()
    assert gc.get_threshold() == cli.GC_THRESHOLD
    assert cli.GC_THRESHOLD[0] >= 10_000  # a young collection per 10k+ net new containers


def test_short_lived_garbage_triggers_no_young_collection_under_the_threshold(restore_gc: None) -> None:
    # What the threshold buys: a burst of short-lived containers (freed by reference counting,
    # as an event's objects are) under the threshold costs no collection at all.
    cli.tune_gc()
    gc.collect()
    before = gc.get_stats()[0]["collections"]
    kept = [{"n": i} for i in range(5_000)]  # 5,000 live containers, well under 20,000
    for i in range(100_000):
        _ = {"event": i, "fields": [i]}  # freed at once
    assert gc.get_stats()[0]["collections"] == before
    assert len(kept) == 5_000
