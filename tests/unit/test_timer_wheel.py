"""Tests for domain.timer_wheel: exact firing, reschedule/cancel, levels, build, a model check."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from domain.timer_wheel import TimerWheel

T0 = 1_700_000_000_123
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR


class EagerCompactWheel(TimerWheel[str]):
    """Compacts at the first stale entry and bounds next_due_ms() by bucket starts, so the
    model check covers both paths."""

    _COMPACT_SLACK = 0
    _SCAN_LIMIT = 1


class CountingDict(dict[str, int]):
    """Counts truth lookups, to prove a pop does not visit timers that are not due."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        CountingDict.lookups += 1
        return super().get(key, default)


def entries(wheel: TimerWheel[Any]) -> int:
    return sum(len(keys) for keys in wheel._keys)


def drain_by_next_due(wheel: TimerWheel[str], limit: int = 10_000) -> list[tuple[str, int, int]]:
    """Act like the timer agent: sleep until next_due_ms(), pop; (key, due, popped_at)."""
    out: list[tuple[str, int, int]] = []
    for _ in range(limit):
        nd = wheel.next_due_ms()
        if nd is None:
            return out
        out.extend((k, d, nd) for k, d in wheel.pop_due(nd))
    raise AssertionError("next_due_ms/pop_due made no progress")


def test_fires_each_timer_exactly_at_its_ms_in_due_order() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    dues = {"a": T0 + 5, "b": T0 + 1, "c": T0 + 300, "d": T0 + 5, "e": T0 + 1000}
    for k, d in dues.items():
        w.schedule(k, d)
    fired_at: dict[str, int] = {}
    for now in range(T0, T0 + 1200):
        got = w.pop_due(now)
        assert [d for _, d in got] == sorted(d for _, d in got)
        for k, d in got:
            assert k not in fired_at
            fired_at[k] = now
            assert d == now
    assert fired_at == dues
    assert len(w) == 0
    assert w.next_due_ms() is None


def test_one_pop_returns_everything_due_sorted_by_due() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    for i, off in enumerate([9 * HOUR, 3, 70_000, 3 * DAY, 255, 256, 257, 2 * HOUR]):
        w.schedule(f"k{i}", T0 + off)
    got = w.pop_due(T0 + 3 * DAY)
    assert [d - T0 for _, d in got] == [3, 255, 256, 257, 70_000, 2 * HOUR, 9 * HOUR, 3 * DAY]
    assert w.pop_due(T0 + 10 * DAY) == []


def test_never_early_never_twice() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    w.schedule("k", T0 + 10_000)
    assert w.pop_due(T0 + 9_999) == []
    assert w.pop_due(T0 + 10_000) == [("k", T0 + 10_000)]
    assert w.pop_due(T0 + 10_000) == []
    assert w.pop_due(T0 + 10 * DAY) == []
    assert w.due_of("k") is None


def test_reschedule_later_fires_only_at_new_time() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    w.schedule("k", T0 + 100)
    w.schedule("k", T0 + 3 * HOUR)  # a new message pushed the idle deadline back
    assert w.due_of("k") == T0 + 3 * HOUR
    assert len(w) == 1
    assert w.pop_due(T0 + 100) == []
    assert w.pop_due(T0 + 3 * HOUR - 1) == []
    assert w.pop_due(T0 + 3 * HOUR) == [("k", T0 + 3 * HOUR)]
    assert w.pop_due(T0 + 4 * HOUR) == []


def test_reschedule_earlier_fires_at_new_time_and_not_again_at_old() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    w.schedule("k", T0 + 2 * DAY)
    w.schedule("k", T0 + 5 * MIN)
    assert w.pop_due(T0 + 5 * MIN - 1) == []
    assert w.pop_due(T0 + 5 * MIN) == [("k", T0 + 5 * MIN)]
    assert w.pop_due(T0 + 3 * DAY) == []


def test_reschedule_back_and_forth_fires_once_at_last_due() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    for off in [10, 5 * HOUR, 20, 2 * DAY, 15, 30 * MIN, 700]:
        w.schedule("k", T0 + off)
    fired = [(k, d, now) for now in range(T0, T0 + 1000) for k, d in w.pop_due(now)]
    assert fired == [("k", T0 + 700, T0 + 700)]
    assert w.pop_due(T0 + 3 * DAY) == []


def test_cancel() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    w.schedule("a", T0 + 50)
    w.schedule("b", T0 + 50)
    assert w.cancel("a") is True
    assert w.cancel("a") is False
    assert w.cancel("never") is False
    assert len(w) == 1
    assert w.due_of("a") is None
    assert w.pop_due(T0 + 1000) == [("b", T0 + 50)]
    w.schedule("a", T0 + 2000)  # a cancelled key can be scheduled again
    assert w.pop_due(T0 + 2000) == [("a", T0 + 2000)]


def test_past_due_fires_on_next_pop() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    w.pop_due(T0 + 5000)
    w.schedule("late", T0 + 10)
    w.schedule("before-start", T0 - DAY)
    assert w.next_due_ms() == T0 - DAY
    assert w.pop_due(T0 + 5000) == [("before-start", T0 - DAY), ("late", T0 + 10)]


def test_time_going_back_never_fires_early() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    w.pop_due(T0 + 1000)
    w.schedule("a", T0 + 500)  # already past for the cursor
    w.schedule("b", T0 + 2000)
    assert w.pop_due(T0 + 400) == []  # a clock stepped back
    assert w.pop_due(T0 + 500) == [("a", T0 + 500)]
    assert w.pop_due(T0 + 1999) == []
    assert w.pop_due(T0 + 2000) == [("b", T0 + 2000)]


# Starts right before digit carries at levels 1, 4 and 5, and past 2**38 (overflow).
STARTS = [T0, ((T0 >> 8) + 1 << 8) - 1, ((T0 >> 26) + 1 << 26) - 7, ((T0 >> 32) + 1 << 32) - 2]
OFFSETS = [1, 255, 256, 257, 16_384, 5 * MIN, 2 * HOUR, 19 * HOUR, 3 * DAY, 60 * DAY, 10 * 365 * DAY]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_far_timers_fire_at_exact_ms_when_jumped_to(start: int, offset: int) -> None:
    w: TimerWheel[str] = TimerWheel(start)
    w.schedule("k", start + offset)
    assert w.pop_due(start + offset - 1) == []
    assert w.pop_due(start + offset) == [("k", start + offset)]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_far_timers_fire_at_exact_ms_when_walked_to(start: int, offset: int) -> None:
    w: TimerWheel[str] = TimerWheel(start)
    due = start + offset
    w.schedule("k", due)
    w.schedule("never", due + 1)
    step = max(1, offset // 97) + 13  # uneven steps cross many bucket boundaries
    for now in range(start, due, step):
        assert w.pop_due(now) == []
        nd = w.next_due_ms()
        assert nd is not None and now < nd <= due
    assert w.pop_due(due - 1) == []
    assert w.pop_due(due) == [("k", due)]
    assert w.due_of("never") == due + 1


@pytest.mark.parametrize("start", STARTS)
def test_sleeping_until_next_due_fires_every_timer_at_its_ms(start: int) -> None:
    w: TimerWheel[str] = TimerWheel(start)
    dues = {f"k{i}": start + off for i, off in enumerate(OFFSETS)}
    for k, d in dues.items():
        w.schedule(k, d)
    w.schedule("gone", start + 3)
    w.cancel("gone")
    w.schedule("k2", start + 1)  # moved earlier: a stale later entry stays behind
    dues["k2"] = start + 1
    fired = drain_by_next_due(w)
    assert all(at == d for _, d, at in fired)
    assert sorted((k, d) for k, d, _ in fired) == sorted(dues.items())


def test_next_due_ms_bounds_the_true_earliest() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    assert w.next_due_ms() is None
    w.schedule("a", T0 + 3 * DAY)
    assert w.next_due_ms() == T0 + 3 * DAY
    w.schedule("b", T0 + 2 * HOUR)
    assert w.next_due_ms() == T0 + 2 * HOUR
    w.schedule("b", T0 + 4 * DAY)  # pushed later: the bound may stay earlier, never later
    nd = w.next_due_ms()
    assert nd is not None and nd <= T0 + 3 * DAY
    w.pop_due(nd)
    assert w.next_due_ms() == T0 + 3 * DAY
    w.cancel("a")
    w.cancel("b")
    assert w.next_due_ms() is None


def test_next_due_ms_of_a_big_bucket_is_its_start_and_still_exact_in_the_end() -> None:
    start = (T0 >> 26) << 26  # the start of a level-4 bucket
    n = TimerWheel._SCAN_LIMIT + 1
    dues = {f"k{i}": start + 3 * DAY + 7 + i * 1_000 for i in range(n)}
    w = TimerWheel.build(dues.items(), start)
    nd = w.next_due_ms()
    assert nd is not None and start < nd <= start + 3 * DAY + 7
    assert nd % (1 << 20) == 0  # a bucket start (level 3 or 4), not a timer's due
    fired = drain_by_next_due(w)
    assert all(at == d for _, d, at in fired)
    assert {k: d for k, d, _ in fired} == dues


@pytest.mark.parametrize("tick", [1, 7, 1000])
def test_coarse_ticks_are_still_exact_to_the_ms(tick: int) -> None:
    w: TimerWheel[str] = TimerWheel(T0, tick_ms=tick)
    w.schedule("a", T0 + 3)
    w.schedule("b", T0 + 1500)
    w.schedule("c", T0 + 2 * HOUR + 1)
    assert w.pop_due(T0 + 2) == []
    assert w.pop_due(T0 + 3) == [("a", T0 + 3)]
    assert w.pop_due(T0 + 1499) == []
    assert w.pop_due(T0 + 1500) == [("b", T0 + 1500)]
    assert w.pop_due(T0 + 2 * HOUR) == []
    assert drain_by_next_due(w) == [("c", T0 + 2 * HOUR + 1, T0 + 2 * HOUR + 1)]


def test_build_equals_scheduling_one_by_one() -> None:
    items = [(f"k{i % 700}", T0 + (i * 7919) % (5 * DAY) - HOUR) for i in range(1000)]
    one: TimerWheel[str] = TimerWheel(T0)
    for k, d in items:
        one.schedule(k, d)
    built = TimerWheel.build(iter(items), T0)
    assert len(built) == len(one) == 700
    assert all(built.due_of(f"k{i}") == one.due_of(f"k{i}") for i in range(700))
    earliest = min(d for d in (one.due_of(f"k{i}") for i in range(700)) if d is not None)
    assert built.next_due_ms() == earliest  # built has no stale entries: exact
    one_nd = one.next_due_ms()
    assert one_nd is not None and one_nd <= earliest
    # Same pops, pop for pop, when driven by the same clock.
    now = T0
    while len(one):
        now += 977 * MIN // 10
        assert built.pop_due(now) == one.pop_due(now)
    assert len(built) == 0


def test_pop_touches_only_due_timers() -> None:
    w = TimerWheel.build(((f"far{i}", T0 + HOUR + i * 3_000) for i in range(100_000)), T0)
    for i in range(5):
        w.schedule(f"near{i}", T0 + 100 + i)
    w._dues = CountingDict(w._dues)
    CountingDict.lookups = 0
    fired = [k for now in range(T0, T0 + 1000) for k, _ in w.pop_due(now)]
    assert fired == [f"near{i}" for i in range(5)]
    assert CountingDict.lookups == 5


def test_stale_entries_stay_bounded() -> None:
    w: TimerWheel[str] = TimerWheel(T0)
    bound = TimerWheel._COMPACT_SLACK + 20
    for i in range(bound + 5_000):
        w.schedule(f"k{i % 10}", T0 + DAY - i)  # always earlier: each one files a new entry
        assert entries(w) <= bound
    for i in range(bound + 5_000):
        w.schedule(f"x{i}", T0 + HOUR)
        w.cancel(f"x{i}")  # each cancel leaves its entry behind
        assert entries(w) <= bound
    expected = {k: w.due_of(k) for k in (f"k{i}" for i in range(10)) if w.due_of(k) is not None}
    assert {k: d for k, d, _ in drain_by_next_due(w)} == expected
    w.pop_due(T0 + 2 * DAY)  # sweeps every bucket holding the cancelled leftovers
    assert entries(w) == 0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tick_ms"):
        TimerWheel(T0, tick_ms=0)
    with pytest.raises(ValueError, match="start_ms"):
        TimerWheel(-1)
    w: TimerWheel[str] = TimerWheel(T0)
    with pytest.raises(ValueError, match="int64"):
        w.schedule("k", 2**63)
    assert len(w) == 0


KEYS = st.sampled_from([f"k{i}" for i in range(8)])
OFFSET = st.one_of(
    st.integers(-50, 300),
    st.integers(-(2**20), 2**22),
    st.integers(0, 2**33),
    st.integers(2**37, 2**40),
)
STEP = st.one_of(
    st.integers(0, 3),
    st.integers(0, 1000),
    st.integers(0, 2**22),
    st.integers(0, 2**33),
    st.integers(2**38, 2**40),
    st.integers(-100, 0),
)


class WheelAgainstModel(RuleBasedStateMachine):
    """TimerWheel must match a dict + sorted scan under any schedule/cancel/pop sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, int] = {}
        self.now = 0
        self.tick = 1
        self.wheel: TimerWheel[str] = TimerWheel(0)

    @initialize(
        start=st.one_of(st.sampled_from(STARTS), st.integers(0, 2**42)),
        tick=st.sampled_from([1, 1, 3, 1000]),
        eager=st.booleans(),
    )
    def init(self, start: int, tick: int, eager: bool) -> None:
        self.now = start
        self.tick = tick
        self.wheel = EagerCompactWheel(start, tick) if eager else TimerWheel(start, tick)

    def check_pop(self, now: int) -> None:
        got = self.wheel.pop_due(now)
        want = sorted((k, d) for k, d in self.model.items() if d <= now)
        for k, _ in want:
            del self.model[k]
        assert [d for _, d in got] == sorted(d for _, d in got)  # due order
        assert sorted(got) == want  # all due ones, none early, none twice

    @rule(key=KEYS, offset=OFFSET)
    def schedule(self, key: str, offset: int) -> None:
        due = max(0, self.now + offset)
        self.wheel.schedule(key, due)
        self.model[key] = due

    @rule(key=KEYS)
    def cancel(self, key: str) -> None:
        assert self.wheel.cancel(key) == (self.model.pop(key, None) is not None)

    @rule(step=STEP)
    def pop(self, step: int) -> None:
        self.now = max(0, self.now + step)
        self.check_pop(self.now)

    @rule()
    def sleep_until_next_due(self) -> None:
        nd = self.wheel.next_due_ms()
        if nd is None:
            assert not self.model
            return
        self.now = max(self.now, nd)
        self.check_pop(self.now)

    @rule()
    def rebuild(self) -> None:
        cls = type(self.wheel)
        self.wheel = cls.build(list(self.model.items()), self.now, self.tick)

    @invariant()
    def agrees(self) -> None:
        assert len(self.wheel) == len(self.model)
        for i in range(8):
            assert self.wheel.due_of(f"k{i}") == self.model.get(f"k{i}")
        nd = self.wheel.next_due_ms()
        if self.model:
            assert nd is not None and nd <= min(self.model.values())
        else:
            assert nd is None


WheelAgainstModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_wheel_against_model = WheelAgainstModel.TestCase
