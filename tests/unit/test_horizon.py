"""The scheduler's time horizon, without IO: what goes to memory, and the load windows."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from domain.actions import due_ms
from domain.horizon import EPOCH, Horizon, at

NOW = 1_700_000_000_000  # ms
SPAN = 600_000  # 10 min


def test_nothing_is_kept_before_the_first_load() -> None:
    h = Horizon(SPAN)
    assert not h.loaded and h.next_load_ms() is None
    assert not h.keeps(at(NOW - 10**9))  # even overdue: the first load reads it from Postgres


def test_first_load_reads_everything_up_to_now_plus_span_then_slices_follow() -> None:
    h = Horizon(SPAN)
    lo, hi = h.begin(NOW)
    assert (lo, hi) == (0, NOW + SPAN)
    h.done()
    assert h.loaded_until == NOW + SPAN
    # the next load is due when half a span is left, and reads exactly the next slice
    assert h.next_load_ms() == NOW + SPAN // 2
    later = NOW + SPAN // 2 + 7
    assert h.begin(later) == (NOW + SPAN, later + SPAN)
    h.done()
    assert h.loaded_until == later + SPAN


def test_slices_tile_time_without_gap_or_overlap() -> None:
    h = Horizon(SPAN)
    windows = []
    for now in (NOW, NOW + 300_000, NOW + 300_001, NOW + 900_000, NOW + 900_000):
        windows.append(h.begin(now))
        h.done()
    for (_, hi), (lo, _) in itertools.pairwise(windows):
        assert lo == hi  # [lo, hi) windows: each action belongs to exactly one load


def test_the_edge_is_exact_to_the_microsecond() -> None:
    h = Horizon(SPAN)
    h.begin(NOW)
    h.done()
    edge = at(NOW + SPAN)
    assert h.keeps(edge - timedelta(microseconds=1))
    assert not h.keeps(edge)  # due exactly at the horizon: the next slice reads it (due_at >= lo)
    assert at(NOW) == EPOCH + timedelta(milliseconds=NOW) and due_ms(at(NOW)) >= NOW


def test_an_arming_during_a_load_uses_the_loads_target() -> None:
    h = Horizon(SPAN)
    h.begin(NOW)
    h.done()
    _, hi = h.begin(NOW + SPAN // 2)
    # the query may not see an arming committed after its snapshot: keep it in memory
    assert h.keeps(at(hi - 1)) and not h.keeps(at(hi))
    h.done()
    assert h.keeps(at(hi - 1))


def test_a_failed_load_leaves_the_horizon_where_it_was() -> None:
    h = Horizon(SPAN)
    h.begin(NOW)
    h.done()
    h.begin(NOW + SPAN)
    h.failed()
    assert h.loaded_until == NOW + SPAN and h.bound() == NOW + SPAN
    assert h.begin(NOW + SPAN + 1) == (NOW + SPAN, NOW + 2 * SPAN + 1)  # the retry reads it all


def test_the_horizon_never_moves_back() -> None:
    h = Horizon(SPAN)
    h.begin(NOW)
    h.done()
    lo, hi = h.begin(NOW - 60_000)  # the clock stepped back a minute
    assert lo == hi == NOW + SPAN
    h.done()
    assert h.loaded_until == NOW + SPAN


def test_one_load_at_a_time_and_a_sane_span() -> None:
    h = Horizon(SPAN)
    h.begin(NOW)
    with pytest.raises(RuntimeError):
        h.begin(NOW)
    h.done()
    with pytest.raises(RuntimeError):
        h.done()
    with pytest.raises(ValueError):
        Horizon(1)
