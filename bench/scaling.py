"""The worker under a backlog and across processes (performance issue 11):

- `catch_up`: a backlog built while the worker is down, then the worker started with live traffic
  still arriving: it must drain faster than it fell behind (a worker whose batches got slower as
  they grew would never catch up).
- `workers`: 1, 2 and 4 worker processes sharing the topic's partitions, each draining the same
  backlog: what a second process buys on this box.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import aiohttp
import asyncpg

from bench import cpu
from bench.pipeline import drained, events, lag, produce_messages, reached, register, stored_rows
from bench.progress import waiting
from bench.stats import row
from parley.localstack import free_port
from parley.status import parse_metrics
from streams.settings import Settings
from streams.topics import Topics
from tests.integration.harness import Deployment, GenericChannel, Services


@dataclass
class CatchUp:
    backlog: int
    behind_rate: float  # events/s arriving while the worker was down (how fast it fell behind)
    live_rate: float  # events/s offered during the catch-up
    catch_up_s: float  # from the worker's start until the backlog was gone
    drain_rate: float  # events/s the worker applied while catching up
    samples: list[tuple[float, int]]  # (seconds since start, lag)


async def catch_up(dep: Deployment, channel_id: str, backlog: int, live_rate: float) -> CatchUp:
    """Stop the worker, produce `backlog` events, start it while `live_rate`/s keep arriving."""
    topic = Topics(dep.name).conversation_events
    run = uuid.uuid4().hex[:6]
    await drained(dep, "catch-up phase")
    dep.stop("worker")
    db = await asyncpg.connect(dep.database_url)
    try:
        base = await stored_rows(db)
        t0 = time.perf_counter()
        await produce_messages(dep.services.bootstrap, topic, channel_id, events(run, backlog, 2000))
        behind_rate = backlog / (time.perf_counter() - t0)
        stop = asyncio.Event()
        produced_live = 0

        async def live() -> None:
            nonlocal produced_live
            start, chunk = time.perf_counter(), max(1, int(live_rate / 10))
            while not stop.is_set():
                items = events(f"{run}l{produced_live}", chunk, 2000)
                await produce_messages(dep.services.bootstrap, topic, channel_id, items)
                produced_live += chunk
                delay = start + produced_live / live_rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the offered load

        started = time.perf_counter()
        dep.start("worker")
        feeder = asyncio.create_task(live())
        samples: list[tuple[float, int]] = []

        async def caught_up() -> bool:
            left = await lag(dep)
            samples.append((time.perf_counter() - started, left))
            # caught up: the backlog and all live traffic but the last second's are in Postgres
            done = await stored_rows(db) - base
            return done >= backlog + produced_live - live_rate and left < live_rate

        await waiting(caught_up, 1800, "the worker to catch up")
        elapsed = time.perf_counter() - started
        applied = await stored_rows(db) - base
        stop.set()
        await feeder
        return CatchUp(backlog, behind_rate, live_rate, elapsed, applied / elapsed, samples)
    finally:
        await db.close()


Usage = dict[str, float]


async def workers(services: Services, counts: tuple[int, ...], n: int) -> dict[int, tuple[float, Usage]]:
    """For each count: a fresh deployment with that many worker processes, every partition
    assigned, then n events produced and drained; returns count -> (events/s, CPU use)."""
    return {count: await _drain_with(services, count, n) for count in counts}


async def _drain_with(services: Services, count: int, n: int) -> tuple[float, Usage]:
    dep = Deployment(services)
    await dep.create_database()
    channel = GenericChannel(id="bench")
    ports = [free_port() for _ in range(count)]
    try:
        dep.start("api")
        for i, port in enumerate(ports):
            dep.start("worker", label=f"worker-{i}", env={"PARLEY_WORKER_METRICS_PORT": str(port)})
        async with aiohttp.ClientSession() as http:
            await dep.wait_api(http)
            await register(http, dep, channel)
        await _all_assigned(ports, Settings().topic_partitions)
        db = await asyncpg.connect(dep.database_url)
        try:
            usage: Usage = {}
            topic = Topics(dep.name).conversation_events
            await produce_messages(services.bootstrap, topic, channel.id, events("k", n, 2000))
            await waiting(lambda: reached(db, 1), 120, "the first row")
            t0, first = time.perf_counter(), await stored_rows(db)
            with cpu.accounting(usage):
                await waiting(lambda: reached(db, n), 900, f"{n:,} rows with {count} worker(s)")
            return (n - first) / (time.perf_counter() - t0), usage
        finally:
            await db.close()
    finally:
        dep.stop_all()


async def _all_assigned(ports: list[int], partitions: int) -> None:
    """Wait until every worker holds partitions and together they hold them all."""

    async def assigned(http: aiohttp.ClientSession, port: int) -> float:
        try:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                return parse_metrics(await r.text()).get("parley_partitions_assigned", 0.0)
        except aiohttp.ClientError:
            return 0.0

    async with aiohttp.ClientSession() as http:

        async def shared() -> bool:
            held = [await assigned(http, port) for port in ports]
            return all(held) and sum(held) == partitions

        await waiting(shared, 300, f"{len(ports)} worker(s) to share the partitions")


def print_catch_up(result: CatchUp, alone: float) -> None:
    """The catch-up phase's rows (`alone`: the worker's rate draining a backlog with no live traffic)."""
    row(
        f"backlog of {result.backlog:,} built while the worker was down",
        f"arrived at {result.behind_rate:,.0f} /s",
    )
    net = result.drain_rate - result.live_rate
    row(
        f"  caught up, with {result.live_rate:,.0f}/s live traffic arriving",
        f"in {result.catch_up_s:,.1f} s",
        f"applied {result.drain_rate:,.0f} /s = {result.drain_rate / alone:.2f}x the worker alone; "
        f"the backlog shrank by {net:,.0f} /s",
    )
    marks = [s for i, s in enumerate(result.samples) if i % max(1, len(result.samples) // 8) == 0]
    row("  lag over time (s: records)", ", ".join(f"{t:.1f}: {n:,}" for t, n in marks))


@dataclass
class Crash:
    events: int
    killed_at: int  # rows written when the worker was killed
    lost: int  # events with no message row
    doubled: int  # events with more than one
    recovered_s: float  # from the kill until every event had its row


async def kill_9(dep: Deployment, channel_id: str, n: int, at: float = 0.4) -> Crash:
    """The peer's crash phase, for Parley: n events queued, the worker killed (-9) when `at` of
    them are rows, restarted at once; then every event must have exactly one row."""
    topic = Topics(dep.name).conversation_events
    run = uuid.uuid4().hex[:6]
    await drained(dep, "kill -9 phase")
    dep.stop("worker")
    db = await asyncpg.connect(dep.database_url)
    try:
        base = await stored_rows(db)
        await produce_messages(dep.services.bootstrap, topic, channel_id, events(run, n, 2000))
        dep.start("worker")
        await waiting(lambda: reached(db, base + int(n * at)), 300, f"{at:.0%} of the rows")
        dep.kill("worker")
        killed, t0 = await stored_rows(db) - base, time.perf_counter()
        dep.start("worker")
        prefix = f"bench-{run}-%"  # provider_message_id = event id with ':' -> '-'

        async def all_in() -> bool:
            got: int = await db.fetchval(
                "SELECT count(DISTINCT provider_message_id) FROM messages WHERE provider_message_id LIKE $1",
                prefix,
            )
            return got >= n

        await waiting(all_in, 600, "every event's row after the kill")
        recovered = time.perf_counter() - t0
        # Lost: no message row. Doubled: applied twice, seen in the audit log, which has no
        # unique key (the messages table's would hide a second insert): one record of a kind
        # per event.
        distinct: int = await db.fetchval(
            "SELECT count(DISTINCT provider_message_id) FROM messages WHERE provider_message_id LIKE $1",
            prefix,
        )
        doubled: int = await db.fetchval(
            "SELECT count(*) - count(DISTINCT (event_id, kind)) FROM conversation_events"
            " WHERE event_id LIKE $1",
            f"bench:{run}:%",
        )
        return Crash(n, killed, n - distinct, doubled, recovered)
    finally:
        await db.close()


def print_crash(crash: Crash) -> None:
    """The kill -9 phase's row."""
    row(
        f"{crash.events:,} events, killed at {crash.killed_at:,} rows, restarted at once",
        f"lost {crash.lost}, doubled {crash.doubled}",
        f"every row {crash.recovered_s:.1f} s after the kill",
    )
