"""Events keep flowing while workers join and leave: a second and a third join, one stops
cleanly, one is killed with -9, and a worker that joins and leaves at once makes the first one
give up and take back its partitions. Every event acknowledged by Kafka ends up applied (in
processed_events) or parked with its error; none is skipped by a rebalance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now
from tests.integration.worker_helpers import metrics

# Small batches keep the agent's queue full while it catches up after each rebalance: what the
# lost events were sitting in (see agents/app.py, _SeekingConsumer).
DEPLOYMENT_ENV = {"PARLEY_SWEEP_INTERVAL": "0", "PARLEY_WORKER_BATCH_SIZE": "10"}
THREADS = 64  # spread over the 8 partitions
BATCH = 40  # records per produce round; about 400 events/s with the pause below
PASSES = 4  # workers joining and leaving at once


@dataclass
class Flow:
    """A steady stream of user messages straight onto the conversation topic."""

    threads: list[Thread]
    produced: dict[str, tuple[int, int]] = field(default_factory=dict)  # event id -> (partition, offset)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, producer: AIOKafkaProducer) -> None:
        """Produce rounds until stopped; an event counts once Kafka acknowledged it."""
        n = 0
        while not self.stopping.is_set():
            sent = []
            for _ in range(BATCH):
                thread = self.threads[n % len(self.threads)]
                record = thread.message(str(n), now())
                n += 1
                fut = await producer.send(thread.topic, record.model_dump_json().encode(), key=thread.key)
                sent.append((record.event_id, fut))
            for event_id, fut in sent:
                meta = await fut
                self.produced[event_id] = (meta.partition, meta.offset)
            await asyncio.sleep(0.1)  # pacing the load, not synchronisation


@contextlib.asynccontextmanager
async def flowing(dep: Deployment, channel: GenericChannel) -> AsyncIterator[Flow]:
    """A Flow running in the background for the duration of the block."""
    flow = Flow([Thread(dep, channel.id) for _ in range(THREADS)])
    producer = AIOKafkaProducer(
        bootstrap_servers=dep.services.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    task = asyncio.create_task(flow.run(producer))
    try:
        yield flow
    finally:
        flow.stopping.set()
        await task  # raises whatever stopped the producer early
        await producer.stop()


async def _partitions(http: aiohttp.ClientSession, workers: list[Deployment]) -> list[float]:
    return [(await metrics(http, w)).get("parley_partitions_assigned", 0) for w in workers]


async def _hold_all(http: aiohttp.ClientSession, workers: list[Deployment], what: str) -> None:
    """Until these workers, and only they, share the 8 partitions (each holding some)."""

    async def shared() -> list[float] | None:
        held = await _partitions(http, workers)
        return held if sum(held) == 8 and min(held) > 0 else None

    await wait_until(shared, 90, what)


async def _missing(db: asyncpg.Connection, flow: Flow) -> list[str]:
    ids = list(flow.produced)
    applied = {r["event_id"] for r in await db.fetch(_APPLIED, ids)}
    rest = [i for i in ids if i not in applied]
    if not rest:
        return []
    parked = {r["event_id"] for r in await db.fetch(_PARKED, rest)}
    return [i for i in rest if i not in parked]


_APPLIED = "SELECT event_id FROM processed_events WHERE event_id = ANY($1::text[])"
# A parked event counts when its letter carries an error (the value is the raw record).
_PARKED = (
    "SELECT e.id AS event_id FROM unnest($1::text[]) AS e(id)"
    " WHERE EXISTS (SELECT 1 FROM dead_letters d WHERE d.value LIKE '%' || e.id || '%' AND d.error <> '')"
)


async def test_events_flowing_through_joins_leaves_and_crashes_are_all_applied(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    first = deployment

    def worker() -> Deployment:
        return Deployment(first.services, name=first.name, extra_env=first.extra_env)

    second, third, passing = worker(), worker(), worker()
    try:
        async with flowing(first, channel) as flow:

            async def some_applied() -> bool:
                n: int = await db.fetchval(_COUNT_APPLIED, list(flow.produced))
                return n >= 200

            await wait_until(some_applied, 60, "the first worker applying the flow")
            second.start("worker")
            await _hold_all(http, [first, second], "a second worker sharing the partitions")
            third.start("worker")
            await _hold_all(http, [first, second, third], "a third worker sharing the partitions")
            second.stop("worker")  # a clean leave: its partitions move to the others
            await _hold_all(http, [first, third], "two workers after the clean leave")
            third.kill("worker")  # a crash: the group notices after the session timeout
            await _hold_all(http, [first], "the first worker alone after the crash")
            # A worker that leaves as soon as it is up, a few times: the first gives up every
            # partition and takes them back (the same ones, or a subset and then all).
            for _ in range(PASSES):
                passing.start("worker")

                async def passing_up() -> bool:
                    return bool(await metrics(http, passing))

                await wait_until(passing_up, 60, "the passing worker up")
                passing.stop("worker")
                await _hold_all(http, [first], "the first worker alone again")
            produced_during = len(flow.produced)

            async def more_after() -> bool:
                return len(flow.produced) >= produced_during + 2 * BATCH

            await wait_until(more_after, 30, "events produced after the last rebalance")

        assert len(flow.produced) > 1000, len(flow.produced)

        async def none_missing() -> bool:
            return not await _missing(db, flow)

        try:
            await wait_until(none_missing, 120, "every produced event applied or parked")
        except AssertionError:
            lost = await _missing(db, flow)
            where = sorted(flow.produced[i] for i in lost)  # (partition, offset)
            raise AssertionError(f"{len(lost)} of {len(flow.produced)} lost, at {where[:50]}") from None
    finally:
        for w in (second, third, passing):
            w.stop_all()


_COUNT_APPLIED = "SELECT count(*) FROM processed_events WHERE event_id = ANY($1::text[])"
