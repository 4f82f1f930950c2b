"""api/ingress.py's batching across requests, against a fake producer: records of one partition
share a closed batch in arrival order, a request is answered only after its batch's ack, a failed
batch fails exactly its own requests, a full batch spills into the next one, large records and
linger 0 go through send()."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from aiokafka.errors import KafkaError, KafkaTimeoutError

from api.ingress import BATCH_RECORD_LIMIT, Ingress, KafkaUnavailable
from streams.settings import Settings
from streams.topics import partition_of


class Builder:
    def __init__(self, capacity: int) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.capacity = capacity
        self.closed = False

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        assert not self.closed
        if self.records and len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    """Batches are acked when the test says so; send() records go straight to `sent`."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self.batches: list[tuple[str, int, Builder, asyncio.Future[None]]] = []
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(8))

    def create_batch(self) -> Builder:
        return Builder(self.capacity)

    async def send_batch(self, builder: Builder, topic: str, *, partition: int) -> asyncio.Future[None]:
        assert builder.closed
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.batches.append((topic, partition, builder, fut))
        return fut

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        self.sent.append((topic, key, value))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def stop(self) -> None:
        pass


def ingress(linger: float = 0.001, capacity: int = 1000) -> tuple[Ingress, FakeProducer]:
    settings = Settings(KAFKA_BOOTSTRAP_SERVERS="x:1", ingress_linger=timedelta(seconds=linger))
    fake = FakeProducer(capacity)
    return Ingress(settings, fake), fake


async def _until(cond: Any) -> None:
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.001)  # the batcher's linger runs on the loop's clock
    raise AssertionError("condition not reached")


async def test_one_batch_per_partition_in_order_answered_only_after_the_ack() -> None:
    ing, fake = ingress()
    keys = [f"ch/{i % 5}".encode() for i in range(40)]
    tasks = [asyncio.create_task(ing.send("t", k, f"v{i}".encode())) for i, k in enumerate(keys)]
    await _until(lambda: fake.batches)
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)  # nothing answered before Kafka's ack
    partitions = {partition_of(k, 8) for k in keys}
    assert sorted(p for _, p, _, _ in fake.batches) == sorted(partitions)  # one batch per partition
    for _, p, builder, _ in fake.batches:
        expected = [(k, f"v{i}".encode()) for i, k in enumerate(keys) if partition_of(k, 8) == p]
        assert builder.records == expected  # arrival order within the partition
    for *_, fut in fake.batches:
        fut.set_result(None)
    await asyncio.gather(*tasks)
    assert fake.sent == []


async def test_a_failed_batch_fails_its_own_requests_only() -> None:
    ing, fake = ingress()
    a, b = b"ch/a", b"ch/b"
    while partition_of(b, 8) == partition_of(a, 8):
        b += b"x"
    ta = asyncio.create_task(ing.send("t", a, b"1"))
    tb = asyncio.create_task(ing.send("t", b, b"2"))
    await _until(lambda: len(fake.batches) == 2)
    for _, p, _, fut in fake.batches:
        if p == partition_of(a, 8):
            fut.set_exception(KafkaTimeoutError())
        else:
            fut.set_result(None)
    with pytest.raises(KafkaUnavailable):
        await ta
    await tb


async def test_a_full_batch_spills_into_the_next_and_each_waits_for_its_own_ack() -> None:
    ing, fake = ingress(capacity=3)
    tasks = [asyncio.create_task(ing.send("t", b"same", str(i).encode())) for i in range(7)]
    await _until(lambda: len(fake.batches) == 3)
    assert [len(b.records) for _, _, b, _ in fake.batches] == [3, 3, 1]
    fake.batches[1][3].set_exception(KafkaError("lost"))
    fake.batches[0][3].set_result(None)
    fake.batches[2][3].set_result(None)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [isinstance(r, KafkaUnavailable) for r in results] == [False] * 3 + [True] * 3 + [False]


async def test_linger_0_and_large_records_go_through_send() -> None:
    ing, fake = ingress(linger=0)
    await ing.send("t", b"k", b"v")
    ing, fake2 = ingress()
    await ing.send("t", b"k", b"x" * (BATCH_RECORD_LIMIT + 1))
    assert fake.sent == [("t", b"k", b"v")] and len(fake2.sent) == 1
    assert fake.batches == [] and fake2.batches == []


async def test_stop_submits_what_is_queued() -> None:
    ing, fake = ingress(linger=0.05)  # the longest allowed: far longer than the steps below
    task = asyncio.create_task(ing.send("t", b"k", b"v"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fake.batches == []
    stopping = asyncio.create_task(ing.stop())
    await _until(lambda: fake.batches)
    fake.batches[0][3].set_result(None)
    await stopping
    await task
