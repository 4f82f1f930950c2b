"""The ledger (processed_events) and the published outbox are pruned past the topic's retention
plus a margin; an unpublished outbox row never is."""

from __future__ import annotations

from datetime import timedelta

import aiohttp
import asyncpg

from agents.ledger import prune, prune_cut
from streams.schema import create_pool
from tests.integration.harness import Deployment, wait_until
from tests.integration.lifecycle_helpers import now
from tests.integration.worker_helpers import metrics

# Retention 1 h + margin 10 min: the worker's pruner (every second) deletes what is older.
DEPLOYMENT_ENV = {
    "PARLEY_TOPIC_RETENTION": "3600",
    "PARLEY_LEDGER_PRUNE_MARGIN": "600",
    "PARLEY_LEDGER_PRUNE_INTERVAL": "1",
}


async def _ledger(db: asyncpg.Connection, ages: dict[str, timedelta]) -> None:
    t = now()
    await db.executemany(
        "INSERT INTO processed_events (event_id, processed_at) VALUES ($1, $2)",
        [(event_id, t - age) for event_id, age in ages.items()],
    )


async def test_the_worker_prunes_rows_older_than_retention_plus_margin(
    http: aiohttp.ClientSession, deployment: Deployment, db: asyncpg.Connection
) -> None:
    old = {f"old-{i}": timedelta(hours=1, minutes=11 + i) for i in range(25)}
    kept = {"within-margin": timedelta(hours=1, minutes=9), "recent": timedelta(minutes=1)}
    await _ledger(db, old | kept)

    async def pruned() -> bool:
        left = {r["event_id"] for r in await db.fetch("SELECT event_id FROM processed_events")}
        return not (left & old.keys())

    await wait_until(pruned, 30, "the old ledger rows to be pruned")
    left = {r["event_id"] for r in await db.fetch("SELECT event_id FROM processed_events")}
    assert kept.keys() <= left
    assert (await metrics(http, deployment))["parley_ledger_pruned_total"] >= len(old)


async def _outbox(db: asyncpg.Connection, rows: dict[str, tuple[timedelta, bool]]) -> None:
    """Outbox rows: event id -> (age, published)."""
    t = now()
    await db.executemany(
        "INSERT INTO outbox (event_id, type, key, payload, created_at, partition, published_at)"
        " VALUES ($1, 'test.pruned', 'k', '{}', $2, 0, $3)",
        [(eid, t - age, t if published else None) for eid, (age, published) in rows.items()],
    )


async def test_the_worker_prunes_published_outbox_rows_too(
    http: aiohttp.ClientSession, deployment: Deployment, db: asyncpg.Connection
) -> None:
    await _outbox(
        db, {"outbox-old": (timedelta(hours=2), True), "outbox-recent": (timedelta(minutes=1), True)}
    )

    async def pruned() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM outbox WHERE event_id = 'outbox-old'") == 0)

    await wait_until(pruned, 30, "the old published outbox row to be pruned")
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE event_id = 'outbox-recent'") == 1
    assert (await metrics(http, deployment))["parley_outbox_pruned_total"] >= 1


async def test_prune_works_in_chunks_and_never_with_infinite_retention(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    deployment.stop("worker")  # this test calls the pruner itself
    ages = {f"chunked-{i}": timedelta(days=30) for i in range(23)} | {"fresh": timedelta(0)}
    await _ledger(db, ages)
    # No worker, so no relay: an unpublished row stays unpublished, and is never pruned.
    await _outbox(
        db, {"sent-long-ago": (timedelta(days=30), True), "never-sent": (timedelta(days=30), False)}
    )
    assert prune_cut(now(), timedelta(seconds=-1), timedelta(days=1)) is None  # keep forever
    cut = prune_cut(now(), timedelta(days=7), timedelta(days=1))
    assert cut is not None
    pool = await create_pool(deployment.database_url, 1)
    try:
        assert await prune(pool, cut, chunk=5) == (23, 1)  # 4 full chunks of 5, then a short one
    finally:
        await pool.close()
    left = {r["event_id"] for r in await db.fetch("SELECT event_id FROM processed_events")}
    assert "fresh" in left and not any(e.startswith("chunked-") for e in left)
    outbox = {r["event_id"] for r in await db.fetch("SELECT event_id FROM outbox WHERE type = 'test.pruned'")}
    assert outbox & {"sent-long-ago", "never-sent"} == {"never-sent"}
