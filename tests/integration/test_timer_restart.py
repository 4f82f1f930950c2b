"""Timers survive a crash: kill -9 the worker with 1,000 timers pending; each fires once."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

from streams.records import InboundMessage
from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now

DEPLOYMENT_ENV = {"PARLEY_TIMEOUT_IDLE": "12", "PARLEY_SWEEP_INTERVAL": "3"}
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
        await wait_until(lambda: _at_least(count, opened, N), 60, "1,000 open conversations")
        await _produce(deployment, second)
        await wait_until(lambda: _at_least(count, moved, EXTENDED), 60, "the extended deadlines")
        closed = "SELECT count(*) FROM conversations WHERE channel_id = $1 AND state = 'closed'"
        assert await count(closed) == 0, "the crash must happen while the timers are pending"
        deployment.kill("worker")
        deployment.start("worker")
        await wait_until(lambda: _at_least(count, closed, N), 120, "every timer to fire")

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
            assert source in {"timer", "sweep"}
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
        # The extensions lived in memory only; after the crash their older timers fired first
        # and re-armed the real deadline (one stale_timer each) instead of closing early.
        rearmed = await db.fetchval(
            "SELECT count(DISTINCT e.conversation_id) FROM conversation_events e JOIN conversations c"
            " ON c.id = e.conversation_id WHERE c.channel_id = $1 AND e.kind = 'stale_timer'",
            channel.id,
        )
        assert rearmed == EXTENDED
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


async def _at_least(count: Callable[[str], Awaitable[int]], sql: str, n: int) -> bool:
    return await count(sql) >= n


async def test_sweep_refires_a_lost_timer_and_counts_it(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    """A conversation whose timer was lost (here: written straight to Postgres, never to the
    timer table) is closed by the backup sweep, through the event log, at its deadline."""
    t = Thread(deployment, channel.id)
    db = await asyncpg.connect(deployment.database_url)
    try:
        deadline = now() - timedelta(seconds=10)
        conv_id = str(uuid.uuid4())
        await db.execute(
            "INSERT INTO conversations (id, channel_id, contact_id, state, version, opened_at, updated_at,"
            " deadline_at, thread_seq) VALUES ($1, $2, $3, 'idle', 1, $4, $4, $5, 1)",
            conv_id,
            channel.id,
            t.contact_id,
            deadline - timedelta(seconds=12),
            deadline,
        )
        [conv] = await t.wait(db, "the sweep to close it", lambda c: c[0]["state"] == "closed", 30)
        assert conv["close_reason"] == "expired"
        [closed] = [e for e in await t.events(db, conv_id) if e["kind"] == "closed"]
        assert closed["cause"].startswith("sweep:")
    finally:
        await db.close()
    async with http.get(f"http://127.0.0.1:{deployment.metrics_port}/metrics") as r:
        metrics = dict(line.split() for line in (await r.text()).splitlines())
    assert float(metrics["parley_sweep_refired_total"]) >= 1
    assert float(metrics["parley_sweep_runs_total"]) >= 1
