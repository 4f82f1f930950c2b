"""The outbox relay: unpublished `outbox` rows -> <prefix>.outgoing-events, in order per key.

Rows are written by the lifecycle agent in the transaction of the change that emitted them (a
conversation change, a status receipt, a schedule fired), so an event exists exactly when its
cause was committed. Each row records its key's partition (streams/outgoing.py); the record is
keyed by the row's key, so it lands on that same partition of the topic.

Order per key: one relay per partition at a time, publishing that partition's rows in id order.
Every worker runs a relay; a round is one transaction that first takes a transaction-level
advisory lock (`pg_try_advisory_xact_lock(LOCK_SPACE, partition)`) on each partition of the
round that no other relay holds, then reads up to `batch` unpublished rows of each partition it
got, in id order, produces them (acks=all), marks them and commits, which releases the locks. A
partition another relay holds is skipped: the holder publishes it. Rows of one key are committed
in id order (the agent's writes for one thread are serialized by its row locks), so a relay sees
a key's rows as an id-ordered prefix; the next holder of a partition starts after the rows its
predecessor marked (the marks are visible once the lock is free).

Which partitions a round covers: the locks are what make it exact, ownership is only a
preference. Outbox keys are the Kafka keys of the conversation topic (a thread, or a schedule's
owner `schedule:<key>`), so a row's partition is the one whose worker wrote it. A woken relay
covers its own worker's partitions: that worker's relay publishes what its agent just committed,
and two workers' relays run side by side instead of the first one locking everything. Every poll
covers all partitions (and the pseudo-partition -1 of rows written before migration 0010), so
rows of processes that own nothing (`parley replay`), of partitions between owners and of a
worker whose relay is failing are still published. Ownership alone would not do: Kafka's
assignment is not mutual exclusion (during a rebalance old and new owner both act for a while),
and a lock dies with its connection, so a killed worker's partitions are free at once.

Lag: a worker's agent wakes its relay after each commit that wrote outbox rows (in-process, no
round trip, nothing added to the batch's transaction); a relay that published rows goes again at
once; one that found a partition taken (the holder may have read before the commit) or rows
outside its own partitions looks again after `retry`; an idle relay polls every `idle`.

Delivery is at least once: a crash between the produce and the commit publishes the same rows
again with the same `id` (in order again, after what was already published); receivers dedupe
by id. Record: key = the row's key, value = {"type", "id", "timestamp", "data"}.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from streams.topics import partitioner

log = logging.getLogger(__name__)

LOCK_SPACE = 0x6F757462  # the relay's advisory locks: (LOCK_SPACE, partition); "outb"
LEGACY = -1  # the pseudo-partition of rows written before migration 0010 (partition IS NULL)

_LOCK = "SELECT p FROM unnest($2::int[]) AS p WHERE pg_try_advisory_xact_lock($1, p)"
# Read in a statement after the locks (READ COMMITTED: a new snapshot), so it sees the marks of
# the relay that held a partition before.
_TAKE = """
SELECT o.id, o.event_id, o.type, o.key, o.payload::text AS payload, o.created_at, o.topic
FROM unnest($1::int[]) AS p(part)
CROSS JOIN LATERAL (
  SELECT id, event_id, type, key, payload, created_at, topic FROM outbox
  WHERE partition = p.part AND published_at IS NULL ORDER BY id LIMIT $2
) o
ORDER BY o.id
"""
_TAKE_LEGACY = """
SELECT id, event_id, type, key, payload::text AS payload, created_at, topic FROM outbox
WHERE partition IS NULL AND published_at IS NULL ORDER BY id LIMIT $1
"""
_MARK = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"


def outgoing_value(row: Any) -> bytes:
    """The record value of one outbox row."""
    return b"".join(
        [
            b'{"type":',
            orjson.dumps(row["type"]),
            b',"id":',
            orjson.dumps(row["event_id"]),
            b',"timestamp":',
            orjson.dumps(row["created_at"].isoformat()),
            b',"data":',
            row["payload"].encode(),  # jsonb as Postgres prints it: valid JSON, not re-parsed
            b"}",
        ]
    )


class OutboxRelay:
    """Publishes the outbox; `published` counts rows (re-publications included)."""

    def __init__(
        self,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        bootstrap: str,
        topic: str,
        partitions: int,
        owned: Callable[[], Collection[int]],
        *,
        batch: int = 1000,
        idle: float = 0.2,
        retry: float = 0.02,
    ) -> None:
        self.pool = pool
        self.bootstrap = bootstrap
        self.topic = topic
        self.topics: dict[str, str] = {}  # the outbox's `topic` column -> the Kafka topic
        self._producer: AIOKafkaProducer | None = None
        self.everything = [*range(partitions), LEGACY]
        self.owned = owned  # the partitions this worker's agent writes (the conversation topic's)
        self.batch = batch  # rows per partition per round
        self.idle = idle  # how long an idle relay waits for a wake-up before looking again
        self.retry = retry  # how soon to look again when another relay held a partition
        self.published = 0
        self._wake = asyncio.Event()
        self._also: set[int] = set()

    async def _producer_started(self) -> AIOKafkaProducer:
        # A producer of its own: aiokafka's futures cost a fraction of Faust's per-record send
        # machinery, and a broker error cannot wedge the agents' shared producer (it is replaced).
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,  # keeps each partition's order across retries
                linger_ms=2,
                max_batch_size=262_144,
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def stop(self) -> None:
        """Flush and close the relay's producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def wake(self, elsewhere: Iterable[int] = ()) -> None:
        """New rows were committed: publish them now rather than at the next poll (`elsewhere`:
        partitions written besides this worker's own, e.g. a send keyed by its channel)."""
        self._also.update(elsewhere)
        self._wake.set()

    async def publish_once(self, partitions: Collection[int]) -> tuple[int, bool]:
        """One round over those of `partitions` no other relay holds: (rows published, any held)."""
        pool = await self.pool()
        async with pool.acquire() as conn, conn.transaction():
            mine = [r["p"] for r in await conn.fetch(_LOCK, LOCK_SPACE, list(partitions))]
            busy = len(mine) < len(partitions)
            parts = [p for p in mine if p != LEGACY]
            rows = list(await conn.fetch(_TAKE, parts, self.batch)) if parts else []
            if LEGACY in mine:
                rows += await conn.fetch(_TAKE_LEGACY, self.batch)
            if not rows:
                return 0, busy
            producer = await self._producer_started()
            try:
                await self._produce(producer, rows)  # acks=all before the rows count as published
            except BaseException:
                await self.stop()  # a fresh producer (new producer id) for the next round
                raise
            await conn.execute(_MARK, [row["id"] for row in rows])
        self.published += len(rows)
        return len(rows), busy

    async def _produce(self, producer: AIOKafkaProducer, rows: list[Any]) -> None:
        """Produce the rows, in order per partition, and wait for every ack. The records go into
        one batch per partition (`create_batch`/`send_batch`): `send()` per record costs the
        relay several times as much CPU (a future, the partitioner, the accumulator per record).
        A record's partition is the default partitioner's for its key, as `send()` would pick."""
        builders: dict[tuple[str, int], Any] = {}
        partitioners: dict[str, Callable[[str], int]] = {}
        futures = []
        for row in rows:
            topic = self.topics.get(row["topic"], self.topic)
            partition_of = partitioners.get(topic)
            if partition_of is None:
                partition_of = partitioners[topic] = partitioner(len(await producer.partitions_for(topic)))
            key: str = row["key"]
            tp = (topic, partition_of(key))
            record = {"key": key.encode(), "value": outgoing_value(row), "timestamp": None}
            builder = builders.get(tp)
            if builder is None:
                builder = builders[tp] = producer.create_batch()
            if builder.append(**record) is None:
                futures.append(await producer.send_batch(builder, topic, partition=tp[1]))  # full
                builder = builders[tp] = producer.create_batch()
                builder.append(**record)
        for (topic, partition), builder in builders.items():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
        await asyncio.gather(*futures)

    async def run(self) -> None:
        """Forever: publish while there is something; else wait for a wake-up or a poll.

        Woken (or with more to do), a round covers this worker's own partitions, whose rows its
        agent just wrote; a poll covers every partition (rows of other processes, pre-0010 rows,
        partitions between owners). The locks, not this choice, keep one relay per partition."""
        everything = True
        elsewhere = False  # a round over every partition found rows: some may remain
        while True:
            self._wake.clear()  # a commit from here on wakes the next wait
            also, self._also = self._also, set()
            partitions = self.everything if everything else sorted({*self.owned(), *also})
            try:
                n, busy = await self.publish_once(partitions) if partitions else (0, False)
            except Exception as exc:  # noqa: BLE001 - Postgres or Kafka trouble: try again soon
                log.warning("outbox relay: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(1)  # back-off after a failure
                everything = True
                continue
            if n:
                elsewhere, everything = everything, False
                continue  # more may be waiting
            soon = busy or elsewhere
            elsewhere = False
            try:
                await asyncio.wait_for(self._wake.wait(), self.retry if soon else self.idle)
                everything = False
            except TimeoutError:
                everything = True  # the poll
