"""The API's Kafka producer: idempotent, acks=all; a request is answered after Kafka's ack.

Webhooks' records are batched across requests: `send()` queues the record with the others of
the same partition and waits; after `PARLEY_INGRESS_LINGER` (1 ms) from the first queued record,
or sooner once `MAX_QUEUED` are queued, each partition's records go to Kafka as one closed batch
(`create_batch` / `send_batch`: no per-record `send()` in aiokafka, sent without aiokafka's own
linger), and every request waits for its batch's acks=all answer, so a 2xx still means Kafka has
the record. Records keep their order per partition (one queue, submitted in order). A linger of 0
turns this off: one aiokafka `send()` per record, as before.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from api.metrics import PRODUCE
from streams.settings import Settings
from streams.topics import partition_of

MAX_QUEUED = 512  # records queued before a flush without waiting for the linger
BATCH_RECORD_LIMIT = 64 * 1024  # a larger record goes alone through send(): it never fails others
_MEMO_LIMIT = 100_000  # partition of a key, remembered (murmur2 in Python: ~5 us a key)

Queued = tuple[bytes, bytes, asyncio.Future[None]]


class KafkaUnavailable(Exception):
    """Kafka did not acknowledge in time; the sender should retry (HTTP 503)."""


class Ingress:
    """Produces records keyed by thread and waits for the broker's acknowledgement."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer | None = None) -> None:
        self.timeout = timeout = settings.produce_timeout.total_seconds()
        self.linger = settings.ingress_linger.total_seconds()
        self.producer = producer or AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            request_timeout_ms=int(timeout * 1000),
            max_batch_size=256 * 1024,
        )
        self._queued: dict[tuple[str, int], list[Queued]] = {}
        self._count = 0
        self._flush_at: asyncio.TimerHandle | None = None
        self._submitting: set[asyncio.Task[None]] = set()
        self._partitions: dict[str, int] = {}
        self._memo: dict[bytes, int] = {}

    async def start(self) -> None:
        """Connect; retried by the caller's supervisor if Kafka is not up yet."""
        await self.producer.start()

    async def stop(self) -> None:
        """Submit what is queued, wait for it, then flush and close."""
        self._flush()
        if self._submitting:
            await asyncio.gather(*self._submitting, return_exceptions=True)
        await self.producer.stop()

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Produce one record and wait for acks=all, or raise KafkaUnavailable."""
        try:
            with PRODUCE.time():
                # asyncio.timeout, not wait_for: wait_for wraps each await in a task of its own
                # (two per webhook were ~9% of the API's CPU in a profile).
                async with asyncio.timeout(self.timeout):
                    if self.linger <= 0 or len(key) + len(value) > BATCH_RECORD_LIMIT:
                        await (await self.producer.send(topic, value=value, key=key))
                    else:
                        await self._queue(topic, key, value)
        except (KafkaError, TimeoutError) as exc:
            raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def send_many(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        """Produce several records (one webhook may carry many) and wait for all acks."""
        try:
            with PRODUCE.time():
                async with asyncio.timeout(self.timeout):
                    futs = [await self.producer.send(topic, value=v, key=k) for k, v in records]
                    await asyncio.gather(*futs)
        except (KafkaError, TimeoutError) as exc:
            raise KafkaUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _partition(self, topic: str, key: bytes) -> int:
        """The partition aiokafka's default partitioner picks (the worker relies on it)."""
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(await self.producer.partitions_for(topic))
        p = self._memo.get(key)
        if p is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            p = self._memo[key] = partition_of(key, n)
        return p

    async def _queue(self, topic: str, key: bytes, value: bytes) -> None:
        partition = await self._partition(topic, key)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.setdefault((topic, partition), []).append((key, value, fut))
        self._count += 1
        if self._count >= MAX_QUEUED:
            self._flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(self.linger, self._flush)
        await fut

    def _flush(self) -> None:
        """Hand every queued partition's records to Kafka, one task per partition."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        queued, self._queued, self._count = self._queued, {}, 0
        for (topic, partition), records in queued.items():
            task = asyncio.create_task(self._submit(topic, partition, records))
            self._submitting.add(task)
            task.add_done_callback(self._submitting.discard)

    async def _submit(self, topic: str, partition: int, records: list[Queued]) -> None:
        """Closed batches of these records to one partition; each record's future gets the ack."""
        try:
            acks = []
            start = 0
            while start < len(records):
                builder = self.producer.create_batch()
                end = start
                while end < len(records):
                    key, value, _ = records[end]
                    if builder.append(key=key, value=value, timestamp=None) is None:
                        break  # full (the first record always fits)
                    end += 1
                builder.close()  # closed: sent at once, without aiokafka's linger
                acks.append((await self.producer.send_batch(builder, topic, partition=partition), start, end))
                start = end
            for ack, first, last in acks:
                try:
                    await ack
                except KafkaError as exc:
                    _settle(records[first:last], exc)
                else:
                    _settle(records[first:last], None)
        except (KafkaError, TimeoutError) as exc:
            _settle(records, exc)
        except BaseException as exc:  # cancelled at stop, or a bug: no request waits forever
            _settle(records, KafkaError(f"not produced: {exc!r}"))
            raise


def _settle(records: list[Queued], exc: BaseException | None) -> None:
    for _, _, fut in records:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
