"""Timers survive a crash: kill -9 the worker with 1,000 timers pending; each fires once.

The sweep is off in this module (PARLEY_SWEEP_INTERVAL=0): every timer must come back from the
timer table or from Postgres at assignment, never from the backup sweep (tests/integration/
test_sweep.py covers the sweep)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from streams.projection import apply_batch
from streams.records import InboundMessage
from streams.schema import create_pool
from streams.settings import Settings
from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now

DEPLOYMENT_ENV = {"PARLEY_TIMEOUT_IDLE": "12", "PARLEY_SWEEP_INTERVAL": "0"}
N = 1000
EXTENDED = 200


async def test_pending_timers_fire_exactly_once_after_kill_9(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    threads = [Thread(deployment, channel.id) for _ in range(N)]
    start = now()
    # A fifth of the threads write again 4 s later: their deadline moves later, which the timer
    # store keeps in memory only (no changelog write) -- the crash below loses it, and the
    # older timer must re-arm it rather than close early.
    first = [(t, t.message("oi", start, "m")) for t in threads]
    second = [(t, t.message("ainda aqui", start + timedelta(seconds=4), "m2")) for t in threads[:EXTENDED]]
    db = await asyncpg.connect(deployment.database_url)
    try:

        async def count(sql: str) -> int:
            n: int = await db.fetchval(sql, channel.id)
            return n

        opened = "SELECT count(*) FROM conversations WHERE channel_id = $1"
        moved = "SELECT count(*) FROM conversations WHERE channel_id = $1 AND version >= 2"
        # In two rounds, so the later deadlines are applied as extensions of existing timers.
        await _produce(deployment, first)
        await wait_until(lambda: _at_least(lambda: count(opened), N), 60, "1,000 open conversations")
        await _produce(deployment, second)
        await wait_until(lambda: _at_least(lambda: count(moved), EXTENDED), 60, "the extended deadlines")
        closed = "SELECT count(*) FROM conversations WHERE channel_id = $1 AND state = 'closed'"
        assert await count(closed) == 0, "the crash must happen while the timers are pending"
        deployment.kill("worker")
        deployment.start("worker")
        await wait_until(lambda: _at_least(lambda: count(closed), N), 120, "every timer to fire")

        rows = await db.fetch(
            "SELECT c.id, c.close_reason, e.cause, e.occurred_at FROM conversations c"
            " JOIN conversation_events e ON e.conversation_id = c.id AND e.kind = 'closed'"
            " WHERE c.channel_id = $1",
            channel.id,
        )
        assert len(rows) == N  # one close per conversation: no timer lost, none fired twice
        assert {r["close_reason"] for r in rows} == {"expired"}
        for r in rows:
            source, _, due = r["cause"].partition(":")
            assert source == "timer"  # the sweep is off: nothing may depend on it
            assert r["occurred_at"] >= datetime.fromisoformat(due)  # never early
        assert await db.fetchval("SELECT count(*) FROM conversations WHERE channel_id = $1", channel.id) == N
        extended = {t.contact_id for t in threads[:EXTENDED]}
        late = await db.fetch(
            "SELECT c.contact_id, e.occurred_at FROM conversations c JOIN conversation_events e"
            " ON e.conversation_id = c.id AND e.kind = 'closed' WHERE c.channel_id = $1",
            channel.id,
        )
        for r in late:
            if r["contact_id"] in extended:  # closed at the extended deadline, not the first one
                assert r["occurred_at"] >= start + timedelta(seconds=4 + 12)
        # The extensions lived in memory only, so the changelog brought back their older
        # timers; the rebuild from Postgres at assignment replaced them with the real deadline
        # before anything fired (no stale_timer needed any more).
        rearmed = await db.fetchval(
            "SELECT count(DISTINCT e.conversation_id) FROM conversation_events e JOIN conversations c"
            " ON c.id = e.conversation_id WHERE c.channel_id = $1 AND e.kind = 'stale_timer'",
            channel.id,
        )
        assert rearmed == 0
    finally:
        await db.close()


async def _produce(dep: Deployment, records: list[tuple[Thread, InboundMessage]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=dep.services.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        topic = Topics(dep.name).conversation_events
        futs = [await producer.send(topic, r.model_dump_json().encode(), key=t.key) for t, r in records]
        for fut in futs:
            await fut
    finally:
        await producer.stop()


async def test_timers_committed_to_postgres_but_never_written_to_the_table_fire_after_restart(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    """The crash window: a batch is committed in Postgres, the worker dies before the timer
    table write. Simulated exactly: the batch is applied to Postgres through the projection
    (ledger and all, as the worker would) while the worker is down, and its events are in the
    topic uncommitted, so the restarted worker finds them all to be ledger duplicates and derives
    nothing from them. Each deadline must still close its conversation once, on time."""
    n = 60
    deployment.stop("worker")
    threads = [Thread(deployment, channel.id) for _ in range(n)]
    start = now()
    events = [(t, t.message("oi", start, "crash-window")) for t in threads]
    pool = await create_pool(deployment.database_url, 1)
    try:
        async with pool.acquire() as conn:
            policy = Settings(timeout_idle=timedelta(seconds=12)).policy()
            done = await apply_batch(conn, [e for _, e in events], policy, 8)
        assert done.applied == n
        # Half of them as migration 0008 carries deadlines over: no partition yet (SQL has no
        # murmur2); the worker's reconcile fills it in and arms them all the same.
        owners = [t.key.decode() for t in threads[: n // 2]]
        await db.execute(
            "UPDATE scheduled_actions SET partition = NULL WHERE owner = ANY($1::text[])", owners
        )
    finally:
        await pool.close()
    await _produce(deployment, events)
    deployment.start("worker")
    await deployment.wait_ready(http)

    async def filled() -> bool:
        return not await db.fetchval("SELECT count(*) FROM scheduled_actions WHERE partition IS NULL")

    await wait_until(filled, 30, "the carried-over actions' partitions filled in")
    deadline = start + timedelta(seconds=12)
    assert now() < deadline - timedelta(seconds=1), "the worker took too long to start for this test"

    async def closed() -> int:
        n_closed: int = await db.fetchval(
            "SELECT count(*) FROM conversations WHERE channel_id = $1 AND contact_id = ANY($2::text[])"
            " AND state = 'closed'",
            channel.id,
            [t.contact_id for t in threads],
        )
        return n_closed

    await wait_until(lambda: _at_least(closed, n), 60, "every deadline of the crash window to fire")
    rows = await db.fetch(
        "SELECT c.close_reason, e.cause, e.occurred_at FROM conversations c"
        " JOIN conversation_events e ON e.conversation_id = c.id AND e.kind = 'closed'"
        " WHERE c.channel_id = $1 AND c.contact_id = ANY($2::text[])",
        channel.id,
        [t.contact_id for t in threads],
    )
    assert len(rows) == n  # once each
    for r in rows:
        assert r["close_reason"] == "expired"
        assert r["cause"].startswith("timer:")
        # on time: a timer fires within ms of its deadline; allow a loaded, shared machine 2 s
        assert deadline <= r["occurred_at"] < deadline + timedelta(seconds=2), r


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n
