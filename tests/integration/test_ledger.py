"""The ledger (processed_events) is pruned past the topic's retention plus a margin."""

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


async def test_prune_works_in_chunks_and_never_with_infinite_retention(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    deployment.stop("worker")  # this test calls the pruner itself
    ages = {f"chunked-{i}": timedelta(days=30) for i in range(23)} | {"fresh": timedelta(0)}
    await _ledger(db, ages)
    assert prune_cut(now(), timedelta(seconds=-1), timedelta(days=1)) is None  # keep forever
    cut = prune_cut(now(), timedelta(days=7), timedelta(days=1))
    assert cut is not None
    pool = await create_pool(deployment.database_url, 1)
    try:
        assert await prune(pool, cut, chunk=5) == 23  # 4 full chunks of 5, then a short one
    finally:
        await pool.close()
    left = {r["event_id"] for r in await db.fetch("SELECT event_id FROM processed_events")}
    assert "fresh" in left and not any(e.startswith("chunked-") for e in left)
