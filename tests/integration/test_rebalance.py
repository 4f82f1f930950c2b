"""Timers follow their partitions: when partitions move to another worker, the first worker
drops their timers (store and wheel) and every timer fires once, from its new owner."""

from __future__ import annotations

from collections import Counter

import aiohttp
import asyncpg

from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now, timedelta
from tests.integration.worker_helpers import firings, metrics, open_threads

TIMEOUT = 40
DEPLOYMENT_ENV = {"PARLEY_TIMEOUT_IDLE": str(TIMEOUT), "PARLEY_SWEEP_INTERVAL": "0"}
N = 200


async def test_moved_partitions_leave_the_first_worker_and_fire_once(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    threads = [Thread(deployment, channel.id) for _ in range(N)]
    start = now()
    await open_threads(deployment, threads, start)

    async def first_holds_all() -> bool:
        return (await metrics(http, deployment)).get("parley_timers_active") == N

    await wait_until(first_holds_all, 60, f"the first worker to hold {N} timers")
    second = Deployment(deployment.services, name=deployment.name, extra_env=deployment.extra_env)
    second.start("worker")
    try:

        async def split() -> tuple[dict[str, float], dict[str, float]] | None:
            a, b = await metrics(http, deployment), await metrics(http, second)
            pa, pb = a.get("parley_partitions_assigned", 0), b.get("parley_partitions_assigned", 0)
            ta, tb = a.get("parley_timers_active", 0), b.get("parley_timers_active", 0)
            moved = pa > 0 and pb > 0 and pa + pb == 8
            return (a, b) if moved and ta > 0 and tb > 0 and ta + tb == N else None

        # Fails on a first worker that keeps the moved partitions' timers (ta stays at N).
        a, b = await wait_until(split, 60, "the timers split between the two workers, none kept twice")
        assert now() < start + timedelta(seconds=TIMEOUT), "rebalanced too late: nothing fired after it"
        assert a["parley_timers_dropped_total"] == b["parley_timers_active"]

        async def all_closed() -> bool:
            n: int = await db.fetchval(
                "SELECT count(*) FROM conversations WHERE channel_id = $1 AND state = 'closed'", channel.id
            )
            return n == N

        await wait_until(all_closed, 60, "every timer to fire")

        async def counted() -> tuple[float, float] | None:
            fa = (await metrics(http, deployment)).get("parley_timers_fired_total", 0)
            fb = (await metrics(http, second)).get("parley_timers_fired_total", 0)
            return (fa, fb) if fa + fb >= N else None

        fa, fb = await wait_until(counted, 30, "both workers' fired counters")
        fired = Counter(f["event_id"] for f in await firings(deployment) if f["channel_id"] == channel.id)
        assert len(fired) == N
        assert set(fired.values()) == {1}, [e for e, n in fired.items() if n > 1][:5]
        assert fa + fb == N and fa > 0 and fb > 0, (fa, fb)
    finally:
        second.stop_all()
