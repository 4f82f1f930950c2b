"""The batch path's intake and loop: order, backpressure, rebalance clears, acks only after handle."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from faust.types import TP, ConsumerMessage

from agents.batching import BatchIntake, SplitIntake, consume_batches


class FakeConsumer:
    """What the intake and the loop use of Faust's consumer."""

    def __init__(self) -> None:
        self.full: list[TP] = []
        self.dropped: list[TP] = []
        self._buffered_partitions: set[TP] = set()
        self.acked: list[tuple[int, int]] = []

    def on_buffer_full(self, tp: TP) -> None:
        assert type(tp) is TP  # Faust asserts its own TP type in its partition sets
        self.full.append(tp)
        self._buffered_partitions.add(tp)

    def on_buffer_drop(self, tp: TP) -> None:
        self.dropped.append(tp)
        self._buffered_partitions.discard(tp)

    def ack(self, message: ConsumerMessage) -> bool:
        self.acked.append((message.partition, message.offset))
        return True


class FakeApp:
    def __init__(self) -> None:
        self.consumer = FakeConsumer()


def msg(partition: int, offset: int) -> ConsumerMessage:
    tp = TopicPartition("t", partition)  # what the aiokafka driver puts in ConsumerMessage.tp
    return ConsumerMessage("t", partition, offset, 0.0, 0, None, b"k", b"v", None, 1, 1, tp)


def intake(limit: int) -> tuple[BatchIntake, FakeConsumer]:
    app: Any = FakeApp()
    return BatchIntake(app, "t", limit), app.consumer


def test_batches_keep_fetch_order_and_are_bounded_by_the_limit() -> None:
    box, _ = intake(3)
    box.put([msg(0, 0), msg(1, 0), msg(0, 1)])
    box.put([msg(0, 2), msg(1, 1)])
    assert [(m.partition, m.offset) for m in box.take()] == [(0, 0), (1, 0), (0, 1)]
    assert box.ready.is_set()
    assert [(m.partition, m.offset) for m in box.take()] == [(0, 2), (1, 1)]
    assert not box.ready.is_set()


def test_two_batches_behind_pauses_the_partitions_until_less_than_one_batch_is_left() -> None:
    box, consumer = intake(2)
    box.put([msg(0, 0), msg(1, 0), msg(0, 1)])
    assert consumer.full == []  # 3 < 2 batches
    box.put([msg(2, 0)])
    assert consumer.full == [TP("t", 2)]  # the partitions of what came in while behind
    box.put([msg(2, 1), msg(1, 1)])  # partition 2 is paused already: not again
    assert sorted(consumer.full) == [TP("t", 1), TP("t", 2)]
    box.take()  # 4 left: still >= 1 batch
    box.take()  # 2 left: still >= 1 batch
    assert consumer.dropped == []
    box.take()  # none left
    assert sorted(consumer.dropped) == [TP("t", 1), TP("t", 2)]
    assert consumer._buffered_partitions == set()


def test_a_rebalance_clear_forgets_what_was_not_taken_and_releases_the_pause() -> None:
    box, consumer = intake(1)
    box.put([msg(0, 0), msg(0, 1), msg(0, 2)])
    assert consumer.full == [TP("t", 0)]
    box.clear()
    assert box.pending == [] and not box.ready.is_set() and box.dropped == 3
    # not handed back through on_buffer_drop: Faust sets the active partitions from the assignment
    assert consumer.dropped == [] and consumer._buffered_partitions == set()
    assert box.take() == []


async def test_messages_are_acked_in_order_only_after_handle_returned() -> None:
    box, consumer = intake(2)
    release = asyncio.Event()
    entered = asyncio.Event()
    handled: list[list[int]] = []
    all_acked = asyncio.Event()

    async def handle(batch: list[Any]) -> None:
        entered.set()
        await release.wait()
        handled.append([m.offset for m in batch])

    def observe(size: int, seconds: float) -> None:
        if len(consumer.acked) == 3:
            all_acked.set()

    fatal: list[BaseException] = []
    loop = asyncio.create_task(
        consume_batches(box, linger=0, handle=handle, name="t", on_fatal=fatal.append, handled=observe)
    )
    box.put([msg(0, 0), msg(0, 1), msg(0, 2)])
    await entered.wait()
    assert consumer.acked == []  # handle has not returned
    release.set()
    await asyncio.wait_for(all_acked.wait(), 5)
    assert handled == [[0, 1], [2]]
    assert consumer.acked == [(0, 0), (0, 1), (0, 2)]
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    assert fatal == []


async def test_a_stop_during_handle_acks_nothing_of_that_batch() -> None:
    box, consumer = intake(10)
    started = asyncio.Event()

    async def handle(batch: list[Any]) -> None:
        started.set()
        await asyncio.Event().wait()  # never returns: the worker stops meanwhile

    loop = asyncio.create_task(
        consume_batches(box, linger=0, handle=handle, name="t", on_fatal=lambda _: None)
    )
    box.put([msg(0, 0), msg(0, 1)])
    await started.wait()
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    assert consumer.acked == []


async def test_a_handle_that_raises_is_fatal_and_nothing_after_it_is_handled_or_acked() -> None:
    box, consumer = intake(1)
    seen: list[int] = []

    async def handle(batch: list[Any]) -> None:
        seen.append(batch[0].offset)
        if batch[0].offset == 1:
            raise RuntimeError("writer broke")

    fatal: list[BaseException] = []
    box.put([msg(0, 0), msg(0, 1), msg(0, 2)])
    await consume_batches(box, linger=0, handle=handle, name="t", on_fatal=fatal.append)
    assert seen == [0, 1]
    assert consumer.acked == [(0, 0)]
    assert len(fatal) == 1 and isinstance(fatal[0], RuntimeError)


async def test_a_split_intake_handles_disjoint_partitions_at_once_and_each_in_order() -> None:
    app: Any = FakeApp()
    box = SplitIntake(app, "t", 2, 2)  # partitions 0, 2 -> part 0; 1, 3 -> part 1
    consumer = app.consumer
    gate = asyncio.Event()
    inside: list[set[int]] = []  # the partitions of each batch being handled, while it is
    handled: list[tuple[int, int]] = []
    both = asyncio.Event()

    async def handle(batch: list[Any]) -> None:
        partitions = {m.partition for m in batch}
        assert len({p % 2 for p in partitions}) == 1  # never both parts in one batch
        inside.append(partitions)
        if len(inside) == 2:
            both.set()  # the second writer entered while the first still waits: concurrent
        await gate.wait()
        handled.extend((m.partition, m.offset) for m in batch)

    all_acked = asyncio.Event()

    def observe(size: int, seconds: float) -> None:
        if len(consumer.acked) == 7:
            all_acked.set()

    loop = asyncio.create_task(
        consume_batches(box, linger=0, handle=handle, name="t", on_fatal=lambda _: None, handled=observe)
    )
    box.put([msg(0, 0), msg(1, 0), msg(2, 0), msg(0, 1), msg(3, 0), msg(1, 1), msg(0, 2)])
    await asyncio.wait_for(both.wait(), 5)
    gate.set()
    await asyncio.wait_for(all_acked.wait(), 5)
    for p in range(4):  # each partition handled and acked in offset order
        assert [o for q, o in handled if q == p] == sorted(o for q, o in handled if q == p)
        assert [o for q, o in consumer.acked if q == p] == sorted(o for q, o in consumer.acked if q == p)
    assert sorted(consumer.acked) == sorted([(0, 0), (1, 0), (2, 0), (0, 1), (3, 0), (1, 1), (0, 2)])
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)


def test_a_split_intake_pauses_and_clears_every_part() -> None:
    app: Any = FakeApp()
    box = SplitIntake(app, "t", 10, 3)
    box.put([msg(p, o) for o in range(4) for p in range(6)])
    assert len(box.pending) == 24 and all(len(part.pending) == 8 for part in box.parts)
    box.hold(True)
    assert all(not part.running.is_set() for part in box.parts)
    box.hold(False)
    assert all(part.running.is_set() for part in box.parts)
    box.clear()
    assert box.pending == [] and sum(part.dropped for part in box.parts) == 24
