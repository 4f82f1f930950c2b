"""How long a worker takes to hold its pending actions again: first from Postgres alone (an empty
table changelog), then after a restart (changelog + Postgres reconcile), with n actions pending."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import psutil

from domain.actions import CLOSE, close_token
from streams.topics import partition_of
from tests.integration.harness import Deployment, wait_until
from tests.integration.worker_helpers import metrics


async def _insert_actions(dsn: str, n: int, partitions: int = 8) -> None:
    """n pending close actions, due in a day (nothing fires during the bench)."""
    due = datetime.now(UTC) + timedelta(days=1)
    conn = await asyncpg.connect(dsn)
    try:
        rows = []
        for i in range(n):
            owner = f"recovery/c{i}"
            rows.append(
                (
                    owner,
                    CLOSE,
                    close_token(str(uuid.uuid4()), 1),
                    due,
                    partition_of(owner.encode(), partitions),
                )
            )
        await conn.copy_records_to_table(
            "scheduled_actions", records=rows, columns=["owner", "name", "token", "due_at", "partition"]
        )
    finally:
        await conn.close()


async def _time_to_hold(http: aiohttp.ClientSession, dep: Deployment, n: int) -> float:
    started = time.perf_counter()
    dep.start("worker")

    async def holds() -> bool:
        return (await metrics(http, dep)).get("parley_timers_active", 0) >= n

    await wait_until(holds, 900, f"the worker to hold {n:,} actions")
    return time.perf_counter() - started


async def recovery(dep: Deployment, n: int) -> tuple[float, float, float]:
    """(seconds to hold n actions from Postgres alone, seconds after a restart, worker RSS MB)."""
    await _insert_actions(dep.database_url, n)
    async with aiohttp.ClientSession() as http:
        first = await _time_to_hold(http, dep, n)
        dep.stop("worker")
        again = await _time_to_hold(http, dep, n)
        rss = psutil.Process(dep.processes["worker"].pid).memory_info().rss / 1e6
    return first, again, rss
