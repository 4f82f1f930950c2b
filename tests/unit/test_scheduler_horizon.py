"""The scheduler's memory under a horizon, without IO: what apply() keeps, and how a load's rows
merge with what the lifecycle agent changed meanwhile (a Faust app on the memory broker, never
started)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import faust
import pytest

from agents import scheduler as scheduler_module
from agents.scheduler import FiringProducer, Scheduler, pack, unpack, wheel_key
from domain.actions import CLOSE, Arm, Disarm, due_ms
from domain.horizon import at
from streams.topics import partition_of

NOW = 1_700_000_000_000
SPAN = 10_000


@pytest.fixture
def scheduler() -> Scheduler:
    app = faust.App("unit-horizon", broker="memory://", store="memory://")
    topic = app.topic("actions-test", key_serializer="raw", value_serializer="raw")
    s = Scheduler(app, topic, 8, horizon=timedelta(milliseconds=SPAN), bootstrap="127.0.0.1:9")
    s.horizon.begin(NOW)
    s.horizon.done()  # loaded until NOW + SPAN
    return s


def _held(s: Scheduler, owner: str) -> dict[str, tuple[str, int]]:
    return unpack(s.table.data.get(owner.encode()))


def _in(seconds: float) -> datetime:
    return at(NOW) + timedelta(seconds=seconds)


def test_only_armings_due_before_the_horizon_go_to_memory(scheduler: Scheduler) -> None:
    scheduler.apply([Arm("a/1", CLOSE, _in(5), "c:1"), Arm("a/2", CLOSE, _in(50), "c:1")])
    assert _held(scheduler, "a/1") == {CLOSE: ("c:1", due_ms(_in(5)))}
    assert _held(scheduler, "a/2") == {}
    assert len(scheduler.wheel) == 1 and scheduler.wheel.due_of(wheel_key(b"a/2", CLOSE)) is None
    # exactly at the horizon is beyond it: the next slice (due_at >= loaded_until) reads it
    scheduler.apply([Arm("a/3", CLOSE, at(NOW + SPAN), "c:1")])
    assert _held(scheduler, "a/3") == {}


def test_moving_a_held_action_beyond_the_horizon_or_disarming_it_drops_it(scheduler: Scheduler) -> None:
    scheduler.apply([Arm("b/1", CLOSE, _in(5), "c:1"), Arm("b/2", CLOSE, _in(6), "c:1")])
    scheduler.apply([Arm("b/1", CLOSE, _in(500), "c:2"), Disarm("b/2", CLOSE)])
    assert _held(scheduler, "b/1") == {} and _held(scheduler, "b/2") == {}
    assert len(scheduler.wheel) == 0
    # and back within it: held again, with the new token
    scheduler.apply([Arm("b/1", CLOSE, _in(2), "c:3")])
    assert _held(scheduler, "b/1") == {CLOSE: ("c:3", due_ms(_in(2)))}


def test_during_a_load_armings_up_to_its_target_are_held_and_marked(scheduler: Scheduler) -> None:
    _, hi = scheduler.horizon.begin(NOW + SPAN // 2)
    scheduler._touched = set()
    scheduler.apply([Arm("c/1", CLOSE, at(hi - 1), "c:1"), Arm("c/2", CLOSE, at(hi), "c:1")])
    assert _held(scheduler, "c/1") != {} and _held(scheduler, "c/2") == {}
    assert scheduler._touched == {wheel_key(b"c/1", CLOSE), wheel_key(b"c/2", CLOSE)}


def _owned(*owners: str) -> set[int]:
    return {partition_of(o.encode(), 8) for o in owners}


def test_a_slice_adds_rows_but_never_overrides_what_the_agent_changed_meanwhile(scheduler: Scheduler) -> None:
    scheduler.apply([Arm("d/1", CLOSE, _in(1), "c:1")])
    # the agent moved d/2 (to 20 s, beyond the slice's target) while the slice read its old row
    wanted = {
        b"d/2": pack({CLOSE: ("c:1", due_ms(_in(12)))}),
        b"d/3": pack({CLOSE: ("c:1", due_ms(_in(13))), "other": ("x", due_ms(_in(14)))}),
    }
    touched = {wheel_key(b"d/2", CLOSE), wheel_key(b"d/3", "other")}
    changed = scheduler._merge(wanted, touched, _owned("d/1", "d/2", "d/3"), full=False)
    assert changed == 1
    assert _held(scheduler, "d/1") == {CLOSE: ("c:1", due_ms(_in(1)))}  # a slice removes nothing
    assert _held(scheduler, "d/2") == {}
    assert _held(scheduler, "d/3") == {CLOSE: ("c:1", due_ms(_in(13)))}  # per action, not per owner
    assert scheduler.wheel.due_of(wheel_key(b"d/3", CLOSE)) == due_ms(_in(13))


def test_a_full_reconcile_makes_memory_equal_postgres_except_what_the_agent_changed(
    scheduler: Scheduler,
) -> None:
    scheduler.apply(
        [Arm("e/1", CLOSE, _in(1), "c:1"), Arm("e/2", CLOSE, _in(2), "c:1"), Arm("e/3", CLOSE, _in(3), "c:1")]
    )
    wanted = {b"e/2": pack({CLOSE: ("c:2", due_ms(_in(4)))}), b"e/4": pack({CLOSE: ("c:1", due_ms(_in(5)))})}
    touched = {wheel_key(b"e/3", CLOSE)}
    scheduler._merge(wanted, touched, _owned("e/1", "e/2", "e/3", "e/4"), full=True)
    assert _held(scheduler, "e/1") == {}  # not in Postgres (before the horizon): gone
    assert _held(scheduler, "e/2") == {CLOSE: ("c:2", due_ms(_in(4)))}
    assert _held(scheduler, "e/3") == {CLOSE: ("c:1", due_ms(_in(3)))}  # the agent's, kept
    assert _held(scheduler, "e/4") == {CLOSE: ("c:1", due_ms(_in(5)))}
    assert len(scheduler.wheel) == 3


class _RefusingOnce:
    """A topic whose first send raises, as a producer in trouble does; it records the rest."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.refused = 0

    async def send(self, *, key: bytes, value: bytes) -> object:
        if not self.refused:
            self.refused += 1
            raise RuntimeError("broker unavailable")
        self.sent.append(value)
        return None


async def test_a_firing_whose_produce_failed_fires_again_with_the_same_id(scheduler: Scheduler) -> None:
    scheduler.apply([Arm("r/1", CLOSE, _in(1), "c:1:1")])
    refusing = _RefusingOnce()
    scheduler.producer = refusing  # type: ignore[assignment]
    key = wheel_key(b"r/1", CLOSE)
    due = due_ms(_in(1))
    assert await scheduler._fire([(key, due)], due + 5) == []  # refused: re-armed a second later
    retry_at = scheduler.wheel.due_of(key)
    assert retry_at is not None and retry_at > due
    await scheduler._fire([(key, retry_at)], retry_at)
    [value] = refusing.sent  # before the fix the wheel's later due made it skip this for good
    assert b'"event_id":"timer:c:1:1:' + str(due).encode() + b'"' in value  # the original's id


class _FakeProducer:
    made: list[_FakeProducer] = []

    def __init__(self, **config: object) -> None:
        self.config = config
        self.stopped = False
        self.sent: list[tuple[str, bytes, bytes]] = []
        _FakeProducer.made.append(self)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, *, value: bytes, key: bytes) -> asyncio.Future[None]:
        if len(_FakeProducer.made) == 1:  # the first producer breaks on its first record
            raise RuntimeError("OutOfOrderSequenceNumber")
        self.sent.append((topic, key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_the_firing_producer_starts_anew_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "AIOKafkaProducer", _FakeProducer)
    _FakeProducer.made.clear()
    producer = FiringProducer("127.0.0.1:9", "t.conversation-events")
    with pytest.raises(RuntimeError):
        await producer.send(key=b"a/1", value=b"{}")
    [broken] = _FakeProducer.made
    assert broken.stopped  # dropped: an idempotent producer that lost a record refuses the rest
    await (await producer.send(key=b"a/1", value=b"{}"))
    [_, fresh] = _FakeProducer.made
    assert fresh.sent == [("t.conversation-events", b"a/1", b"{}")]
    assert fresh.config["acks"] == "all" and fresh.config["enable_idempotence"] is True
    await producer.drop()
    assert fresh.stopped
