"""The backup sweep: it finds lost timers in Postgres, and each worker sweeps only its own
partitions, once per overdue conversation while its partition has not caught up."""

from __future__ import annotations

import uuid
from datetime import timedelta

import aiohttp
import asyncpg

from domain.actions import CLOSE, close_token
from streams.topics import partition_of, thread_key
from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now
from tests.integration.worker_helpers import firings, metrics

DEPLOYMENT_ENV = {"PARLEY_SWEEP_INTERVAL": "1", "PARLEY_TIMEOUT_IDLE": "3600"}


async def insert_overdue(db: asyncpg.Connection, thread: Thread, overdue: timedelta) -> str:
    """An open conversation whose deadline passed and whose timer exists only as its durable
    intent in Postgres (its scheduled_actions row): lost from the timer table and wheel."""
    deadline = now() - overdue
    conv_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO conversations (id, channel_id, contact_id, state, version, opened_at, updated_at,"
        " deadline_at, thread_seq) VALUES ($1, $2, $3, 'idle', 1, $4, $4, $5, 1)",
        conv_id,
        thread.channel_id,
        thread.contact_id,
        deadline - timedelta(seconds=12),
        deadline,
    )
    owner = thread_key(thread.channel_id, thread.contact_id)
    await db.execute(
        "INSERT INTO scheduled_actions (owner, name, token, due_at, partition) VALUES ($1, $2, $3, $4, $5)",
        owner.decode(),
        CLOSE,
        close_token(conv_id, 1),
        deadline,
        partition_of(owner, 8),
    )
    return conv_id


async def test_sweep_refires_a_lost_timer_and_counts_it(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel
) -> None:
    """A conversation whose timer was lost (here: written straight to Postgres, never to the
    timer table) is closed by the backup sweep, through the event log, at its deadline."""
    t = Thread(deployment, channel.id)
    db = await asyncpg.connect(deployment.database_url)
    try:
        conv_id = await insert_overdue(db, t, timedelta(seconds=10))
        [conv] = await t.wait(db, "the sweep to close it", lambda c: c[0]["state"] == "closed", 30)
        assert conv["close_reason"] == "expired"
        [closed] = [e for e in await t.events(db, conv_id) if e["kind"] == "closed"]
        assert closed["cause"].startswith("sweep:")
    finally:
        await db.close()

    async def counted() -> bool:  # the run that re-fired it counts once it is over
        m = await metrics(http, deployment)
        return m.get("parley_sweep_refired_total", 0) >= 1 and m.get("parley_sweep_runs_total", 0) >= 1

    await wait_until(counted, 30, "the sweep's metrics to count the re-fired timer")


async def _sweeps(http: aiohttp.ClientSession, workers: tuple[Deployment, ...], n: int) -> None:
    """Until every worker ran n more sweeps."""
    runs = [(await metrics(http, d)).get("parley_sweep_runs_total", 0) for d in workers]

    async def more() -> bool:
        now_runs = [(await metrics(http, d)).get("parley_sweep_runs_total", 0) for d in workers]
        return all(m >= r + n for m, r in zip(now_runs, runs, strict=True))

    await wait_until(more, 30, f"{n} more sweeps on each worker")


async def test_each_worker_sweeps_only_its_own_partitions_once(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    """Two workers share the partitions. Overdue conversations on every partition are re-fired
    by the partition's owner only, and once: not once per worker, nor once per sweep run while
    the first firing is still queued."""
    second = Deployment(deployment.services, name=deployment.name, extra_env=deployment.extra_env)
    second.start("worker")
    try:
        partitions = 8  # PARLEY_TOPIC_PARTITIONS' default, used by the deployment

        async def shared() -> tuple[dict[str, float], dict[str, float]] | None:
            a, b = await metrics(http, deployment), await metrics(http, second)
            pa, pb = a.get("parley_partitions_assigned", 0), b.get("parley_partitions_assigned", 0)
            return (a, b) if pa > 0 and pb > 0 and pa + pb == partitions else None

        await wait_until(shared, 90, "both workers to hold partitions")
        # A worker joining may take more than one rebalance; let both sweep twice in the new
        # assignment first (a rebalance after the inserts would also be fine for correctness:
        # the timer rebuild from Postgres then fires some of them, with the same event ids).
        await _sweeps(http, (deployment, second), 2)
        before_a, before_b = await wait_until(shared, 30, "both workers to hold partitions")
        threads = [Thread(deployment, channel.id) for _ in range(40)]
        ids = {await insert_overdue(db, t, timedelta(seconds=30)) for t in threads}

        async def all_closed() -> bool:
            n: int = await db.fetchval(
                "SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[]) AND state = 'closed'",
                list(ids),
            )
            return n == len(ids)

        await wait_until(all_closed, 60, "the sweep to close every overdue conversation")
        # Let both workers sweep twice more after the closes: a duplicating sweep would show.
        await _sweeps(http, (deployment, second), 2)
        after_a, after_b = await metrics(http, deployment), await metrics(http, second)
        by_a = after_a["parley_sweep_refired_total"] - before_a["parley_sweep_refired_total"]
        by_b = after_b["parley_sweep_refired_total"] - before_b["parley_sweep_refired_total"]
        fired: dict[str, list[str]] = {}
        for f in await firings(deployment):
            if f["conversation_id"] in ids:
                fired.setdefault(f["conversation_id"], []).append(f["source"])
        # One firing per conversation in all (not one per worker, nor one per run), each from
        # its partition's owner; the workers' counters add up to the sweep firings on the topic.
        assert {c: len(sources) for c, sources in fired.items()} == dict.fromkeys(ids, 1), fired
        swept = sum(sources.count("sweep") for sources in fired.values())
        assert by_a + by_b == swept, (by_a, by_b, swept)
        assert by_a > 0 and by_b > 0, (by_a, by_b)
    finally:
        second.stop_all()
