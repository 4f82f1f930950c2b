"""The simulator's limiters against made-up times: exact window counts and the pair-rate bucket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sandbox.limits import TokenBucket, WindowLimit, max_in_window


def test_window_limit_admits_n_per_window_and_frees_a_slot_exactly_one_window_later() -> None:
    limit = WindowLimit(3, window=1.0)
    assert [limit.try_take(t) for t in (0.0, 0.1, 0.2, 0.3, 0.999)] == [True, True, True, False, False]
    assert limit.try_take(1.0)  # the send at 0.0 has left [t, t + 1)
    assert not limit.try_take(1.05)
    assert limit.try_take(1.1)


def test_refused_sends_do_not_count() -> None:
    limit = WindowLimit(1)
    assert limit.try_take(0.0)
    assert not any(limit.try_take(0.01 * i) for i in range(1, 100))
    assert limit.try_take(1.0)


@given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), max_size=300), st.integers(1, 20))
def test_whatever_arrives_no_window_holds_more_than_the_limit(arrivals: list[float], n: int) -> None:
    limit = WindowLimit(n)
    accepted = [t for t in sorted(arrivals) if limit.try_take(t)]
    assert max_in_window(accepted) <= n


def test_max_in_window_is_half_open() -> None:
    assert max_in_window([]) == 0
    assert max_in_window([0.0, 0.5, 0.999]) == 3
    assert max_in_window([0.0, 0.5, 1.0]) == 2
    assert max_in_window([3.0, 0.0, 0.2, 2.5, 2.9, 3.4]) == 4


def test_pair_bucket_bursts_then_pays_back_one_token_per_refill_period() -> None:
    bucket = TokenBucket(capacity=45, refill_per_s=1 / 6, now=0.0)
    assert sum(bucket.try_take(0.0) for _ in range(60)) == 45
    assert not bucket.try_take(5.9)
    assert bucket.try_take(6.01)
    assert not bucket.try_take(6.1)
    assert sum(bucket.try_take(1000.0) for _ in range(60)) == 45  # refilled, never past capacity
