"""Two or more workers share the partitions: a worker killed with -9 while its partitions hold
pending actions, and a worker joining (a clean rebalance), lose none and double none.

The sweep is off: every close must come from the engine (table, wheel, Postgres reconcile)."""

from __future__ import annotations

from collections import Counter

import aiohttp
import asyncpg

from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now, timedelta
from tests.integration.schedule_helpers import call, outgoing
from tests.integration.worker_helpers import firings, metrics, open_threads

TIMEOUT = 30
DEPLOYMENT_ENV = {"PARLEY_TIMEOUT_IDLE": str(TIMEOUT), "PARLEY_SWEEP_INTERVAL": "0"}
N = 1000


async def _active(http: aiohttp.ClientSession, workers: list[Deployment]) -> list[float]:
    return [(await metrics(http, w)).get("parley_timers_active", 0) for w in workers]


async def _all_closed_once(db: asyncpg.Connection, deployment: Deployment, threads: list[Thread]) -> None:
    contacts = [t.contact_id for t in threads]

    async def closed() -> bool:
        n: int = await db.fetchval(
            "SELECT count(*) FROM conversations WHERE contact_id = ANY($1::text[]) AND state = 'closed'",
            contacts,
        )
        return n == len(threads)

    await wait_until(closed, 120, f"all {len(threads)} conversations to close")
    rows = await db.fetch(
        "SELECT c.id, c.deadline_at, c.closed_at, c.close_reason,"
        " (SELECT count(*) FROM conversation_events e WHERE e.conversation_id = c.id AND e.kind = 'closed')"
        " AS closes,"
        " (SELECT max(occurred_at) FROM conversation_events e WHERE e.conversation_id = c.id"
        "  AND e.kind IN ('opened', 'transition')) AS armed_at"
        " FROM conversations c WHERE c.contact_id = ANY($1::text[])",
        contacts,
    )
    assert len(rows) == len(threads)
    assert {r["closes"] for r in rows} == {1}, "a conversation closed twice or never"
    assert {r["close_reason"] for r in rows} == {"expired"}
    early = [r for r in rows if r["closed_at"] < r["armed_at"] + timedelta(seconds=TIMEOUT)]
    assert not early, f"{len(early)} closed before their deadline"
    fired = Counter(f["event_id"] for f in await firings(deployment) if f["contact_id"] in set(contacts))
    # Repeats are allowed on the topic (same id, a ledger no-op) but every conversation's
    # deadline fired under exactly one identity.
    assert len(fired) == len(threads)


async def test_kill_9_of_one_of_two_workers_loses_and_doubles_no_action(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    second = Deployment(deployment.services, name=deployment.name, extra_env=deployment.extra_env)
    second.start("worker")
    third = Deployment(deployment.services, name=deployment.name, extra_env=deployment.extra_env)
    try:

        async def shared() -> bool:
            a, b = await metrics(http, deployment), await metrics(http, second)
            pa, pb = a.get("parley_partitions_assigned", 0), b.get("parley_partitions_assigned", 0)
            return pa > 0 and pb > 0 and pa + pb == 8

        await wait_until(shared, 90, "two workers sharing the 8 partitions")
        threads = [Thread(deployment, channel.id) for _ in range(N)]
        start = now()
        await open_threads(deployment, threads, start)

        async def pending_on_both() -> list[float] | None:
            active = await _active(http, [deployment, second])
            return active if sum(active) == N and min(active) > 0 else None

        before = await wait_until(pending_on_both, 60, f"{N} actions pending on both workers")
        deployment.kill("worker")  # kill -9, with before[0] actions pending on its partitions
        assert now() < start + timedelta(seconds=TIMEOUT), "killed too late: its actions had fired"

        async def survivor_holds_all() -> bool:
            return (await _active(http, [second]))[0] == N or now() > start + timedelta(seconds=TIMEOUT)

        await wait_until(survivor_holds_all, 60, "the survivor to take the dead worker's actions")
        await _all_closed_once(db, deployment, threads)
        assert before[0] > 0

        # A clean rebalance: a third worker joins while another N actions are pending.
        more = [Thread(deployment, channel.id) for _ in range(N)]
        start = now()
        await open_threads(deployment, more, start)

        async def survivor_pending() -> bool:
            return (await _active(http, [second]))[0] == N

        await wait_until(survivor_pending, 60, f"{N} new actions pending on the survivor")
        third.start("worker")

        async def split() -> bool:
            active = await _active(http, [second, third])
            return sum(active) == N and min(active) > 0

        await wait_until(split, 60, "the actions split between the survivor and the newcomer")
        assert now() < start + timedelta(seconds=TIMEOUT), "rebalanced too late: nothing was pending"
        await _all_closed_once(db, deployment, more)
    finally:
        second.stop_all()
        third.stop_all()


async def test_user_schedules_survive_a_kill_9_of_one_of_two_workers(
    http: aiohttp.ClientSession, deployment: Deployment, db: asyncpg.Connection
) -> None:
    """The same engine for user schedules: their owner keys (schedule:<key>) spread over both
    workers' partitions; one is killed with -9 while they are pending; each fires once, on time."""
    second = Deployment(deployment.services, name=deployment.name, extra_env=deployment.extra_env)
    if "worker" not in deployment.processes:  # the previous test killed this module's first worker
        deployment.start("worker")
    second.start("worker")
    try:

        async def shared() -> bool:
            a, b = await metrics(http, deployment), await metrics(http, second)
            pa, pb = a.get("parley_partitions_assigned", 0), b.get("parley_partitions_assigned", 0)
            return pa > 0 and pb > 0 and pa + pb == 8

        await wait_until(shared, 90, "two workers sharing the 8 partitions")
        run = now().strftime("%H%M%S")
        keys = [f"pin:{run}:{i}" for i in range(N)]
        due = now() + timedelta(seconds=TIMEOUT)
        items = [
            {"key": k, "run_at": due.isoformat(), "event_type": "pin.generate", "payload": {}} for k in keys
        ]
        code, answer = await call(http, deployment, "POST", "/v1/schedules:batch", {"items": items})
        assert code == 200 and {a["code"] for a in answer["items"]} == {201}, answer

        async def pending_on_both() -> list[float] | None:
            active = await _active(http, [deployment, second])
            return active if sum(active) >= N and min(active) > 0 else None

        await wait_until(pending_on_both, 60, f"{N} schedules pending on both workers")
        deployment.kill("worker")
        assert now() < due, "killed too late: the schedules had fired"

        async def all_fired() -> bool:
            n: int = await db.fetchval(
                "SELECT count(*) FROM schedules WHERE key = ANY($1::text[]) AND status = 'fired'", keys
            )
            return n == N

        await wait_until(all_fired, 120, f"all {N} schedules to fire")
        early = await db.fetchval(
            "SELECT count(*) FROM schedules WHERE key = ANY($1::text[]) AND fired_at < run_at", keys
        )
        assert early == 0

        async def all_published() -> bool:  # the outbox relay publishes after the firing commits
            n: int = await db.fetchval(
                "SELECT count(*) FROM outbox WHERE key = ANY($1::text[]) AND type = 'schedule.fired'"
                " AND published_at IS NOT NULL",
                [f"schedule:{k}" for k in keys],  # outgoing events are keyed by the owner key
            )
            return n >= N

        await wait_until(all_published, 60, "every schedule.fired published")
        fired = Counter(
            e["id"]
            for e in await outgoing(deployment)
            if e["type"] == "schedule.fired" and e["_key"] in {f"schedule:{k}" for k in keys}
        )
        assert len(fired) == N  # one firing identity per schedule (a relay repeat carries the same id)
    finally:
        second.stop_all()
