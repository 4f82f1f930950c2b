"""Timer figures: worker memory per active timer, and 100k timers firing within one minute."""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.scheduler import pack, wheel_key
from bench.pipeline import produce_messages
from bench.progress import waiting
from domain.actions import CLOSE, close_token
from domain.timer_wheel import TimerWheel
from streams.records import CONVERSATION_EVENT, TimerFiredRecord
from streams.topics import Topics, thread_key
from tests.integration.harness import Deployment, wait_until


def memory_per_timer(n: int) -> tuple[float, float]:
    """Bytes per active timer in the worker: (timer table as Faust's memory store holds it + the
    wheel, keys included; the wheel alone, keys excluded)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    keys = [thread_key("whatsapp-main", f"55{11_900_000_000 + i}") for i in range(n)]
    now = int(time.time() * 1000)
    table = {
        k: pack({CLOSE: (close_token(str(uuid.uuid4()), 3), now + random.randint(0, 48 * 3600_000))})
        for k in keys
    }
    after_table = tracemalloc.get_traced_memory()[0]
    wheel = TimerWheel.build(((wheel_key(k, CLOSE), now + 1000 + i) for i, k in enumerate(keys)), now)
    total = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(table) == len(wheel) == n
    return (total - base) / n, (total - after_table) / n


@dataclass
class Firing:
    """What the timer-firing run measured."""

    closes: int
    early: int
    duplicates: int
    timer_events: int
    lateness: list[float]
    fire_to_row: list[float]
    close_rate: float


async def firing(dep: Deployment, channel_id: str, n: int, spread_s: float, idle_s: float) -> Firing:
    """Open n conversations whose idle deadlines fall within `spread_s` seconds, let the worker's
    timers close them, and measure lateness (fired - due), early and duplicate firings, and the
    close events' rate and fire-to-row latency."""
    topic = Topics(dep.name).conversation_events
    start = datetime.now(UTC)
    run = uuid.uuid4().hex[:6]
    items = (
        (f"timer-bench:{run}:{i}", f"t{run}-{i}", start + timedelta(seconds=spread_s * i / n))
        for i in range(n)
    )
    await produce_messages(dep.services.bootstrap, topic, channel_id, items)
    db = await asyncpg.connect(dep.database_url)
    try:
        like = f"t{run}-%"

        async def opened() -> bool:
            got: int = await db.fetchval("SELECT count(*) FROM conversations WHERE contact_id LIKE $1", like)
            return got >= n

        await waiting(opened, 600, "every conversation opened")
        armed = datetime.now(UTC)
        if armed > start + timedelta(seconds=idle_s):
            print(
                f"  (warning: opening took {(armed - start).total_seconds():.0f}s, longer than the idle "
                "timeout: some timers were already due when set)",
                flush=True,
            )

        async def closed() -> bool:
            got: int = await db.fetchval(
                "SELECT count(*) FROM conversations WHERE contact_id LIKE $1 AND state = 'closed'", like
            )
            return got >= n

        await wait_until(closed, 600 + idle_s + spread_s, "every timer to fire")
        rows = await db.fetch(
            "SELECT e.cause, e.occurred_at, e.recorded_at FROM conversation_events e"
            " JOIN conversations c ON c.id = e.conversation_id"
            " WHERE c.contact_id LIKE $1 AND e.kind = 'closed'",
            like,
        )
    finally:
        await db.close()
    lateness = []
    fire_to_row = []
    early = 0
    for r in rows:
        _source, _, due = r["cause"].partition(":")
        late = (r["occurred_at"] - datetime.fromisoformat(due)).total_seconds()
        early += late < 0
        lateness.append(late)
        fire_to_row.append((r["recorded_at"] - r["occurred_at"]).total_seconds())
    fired = await _timer_events(dep, topic, channel_id, run)
    duplicates = sum(c - 1 for c in fired.values() if c > 1)
    recorded = sorted(r["recorded_at"] for r in rows)
    span = (recorded[-1] - recorded[0]).total_seconds() or 1e-9
    return Firing(len(rows), early, duplicates, sum(fired.values()), lateness, fire_to_row, len(rows) / span)


async def _timer_events(dep: Deployment, topic: str, channel_id: str, run: str) -> Counter[str]:
    """How many TimerFired records the topic holds per timer (a duplicate firing shows as >1)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=dep.services.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        max_poll_records=5000,
    )
    await consumer.start()
    counts: Counter[str] = Counter()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        done: set[TopicPartition] = set()
        while len(done) < len(tps):
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for rec in records:
                    if b"timer.fired" in rec.value and f"t{run}-".encode() in rec.key:
                        event = CONVERSATION_EVENT.validate_json(rec.value)
                        if isinstance(event, TimerFiredRecord) and event.source == "timer":
                            counts[event.event_id] += 1
                if records and records[-1].offset >= end[tp] - 1:
                    done.add(tp)
            done |= {tp for tp in tps if end[tp] == 0}
    finally:
        await consumer.stop()
    return counts
