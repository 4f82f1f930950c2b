"""Schedules through the API: creates by the batch route, reschedules and cancels with 64 in
flight, and n schedules due within one minute (firing and publishing lateness)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from bench.progress import waiting
from tests.integration.harness import Deployment


async def _batch(http: aiohttp.ClientSession, dep: Deployment, items: list[dict[str, Any]]) -> None:
    async with http.post(
        f"{dep.base_url}/v1/schedules:batch", json={"items": items}, headers=dep.admin_headers()
    ) as r:
        body = await r.json()
        assert r.status == 200, body
        bad = [i for i in body["items"] if i["code"] not in (200, 201)]
        assert not bad, bad[:3]


async def create(
    http: aiohttp.ClientSession, dep: Deployment, keys: list[str], run_at: list[datetime], parallel: int = 4
) -> float:
    """Creates per second through POST /v1/schedules:batch (1,000 per request, `parallel` at once)."""
    chunks = [
        [
            {"key": k, "run_at": t.isoformat(), "event_type": "bench.fired", "payload": {"n": i}}
            for i, (k, t) in enumerate(zip(keys[o : o + 1000], run_at[o : o + 1000], strict=True))
        ]
        for o in range(0, len(keys), 1000)
    ]
    gate = asyncio.Semaphore(parallel)

    async def one(chunk: list[dict[str, Any]]) -> None:
        async with gate:
            await _batch(http, dep, chunk)

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in chunks))
    return len(keys) / (time.perf_counter() - start)


async def change(
    http: aiohttp.ClientSession, dep: Deployment, keys: list[str], in_flight: int = 64
) -> tuple[float, list[float]]:
    """Reschedules (first half of keys) and cancels (second half) per second, and each latency."""
    later = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []
    half = len(keys) // 2

    async def one(i: int, key: str) -> None:
        async with gate:
            started = time.perf_counter()
            url = f"{dep.base_url}/v1/schedules/{key}"
            if i < half:
                body = {"run_at": later, "event_type": "bench.fired", "payload": {"n": i}}
                async with http.put(url, json=body, headers=dep.admin_headers()) as r:
                    assert r.status == 200, await r.text()
            else:
                async with http.delete(url, headers=dep.admin_headers()) as r:
                    assert r.status == 200, await r.text()
            latencies.append(time.perf_counter() - started)

    start = time.perf_counter()
    await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
    return len(keys) / (time.perf_counter() - start), latencies


async def firing(http: aiohttp.ClientSession, dep: Deployment, n: int, create_rate: float) -> dict[str, Any]:
    """n schedules due within one minute, starting once they can all be created: lateness of the
    firing (fired_at - run_at), of the publication on outgoing-events (published_at - run_at) and
    the relay's share of it (published_at - fired_at: the commit that fired it to the mark)."""
    run = uuid.uuid4().hex[:6]
    keys = [f"due:{run}:{i}" for i in range(n)]
    lead = timedelta(seconds=15 + 1.5 * n / create_rate)  # all created before the first is due
    first = datetime.now(UTC) + lead
    run_at = [first + timedelta(seconds=60 * i / n) for i in range(n)]
    await create(http, dep, keys, run_at)
    created = datetime.now(UTC)
    db = await asyncpg.connect(dep.database_url)
    try:

        async def published() -> bool:
            got: int = await db.fetchval(
                "SELECT count(*) FROM outbox WHERE key LIKE $1 AND type = 'schedule.fired'"
                " AND published_at IS NOT NULL",
                f"schedule:due:{run}:%",
            )
            return got >= n

        await waiting(published, 600, f"all {n:,} schedules fired and published")
        rows = await db.fetch(
            "SELECT extract(epoch FROM s.fired_at - s.run_at) AS fire,"
            " extract(epoch FROM o.published_at - s.run_at) AS publish,"
            " extract(epoch FROM o.published_at - s.fired_at) AS relay"
            " FROM schedules s JOIN outbox o ON o.key = 'schedule:' || s.key AND o.type = 'schedule.fired'"
            " WHERE s.key LIKE $1",
            f"due:{run}:%",
        )
        fired_twice: int = await db.fetchval(
            "SELECT count(*) FROM (SELECT key FROM outbox WHERE key LIKE $1 AND type = 'schedule.fired'"
            " GROUP BY key HAVING count(*) > 1) d",
            f"schedule:due:{run}:%",
        )
    finally:
        await db.close()
    fire = [float(r["fire"]) for r in rows]
    return {
        "created_before_due": created < first,
        "fire": fire,
        "publish": [float(r["publish"]) for r in rows],
        "relay": [float(r["relay"]) for r in rows],
        "early": sum(1 for f in fire if f < 0),
        "duplicates": fired_twice,
    }
