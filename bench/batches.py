"""The projection alone against Postgres: apply time per event by batch size (is a batch's cost
linear?), and what one poison event costs a batch (bisection vs one event at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from agents.runner import apply_isolating, with_retries
from domain.policy import LifecyclePolicy
from streams import jsonrows
from streams.projection import apply_batch
from streams.records import InboundMessage
from streams.schema import create_pool, migrate

POLICY = LifecyclePolicy()
RETRIES = 5  # PARLEY_WORKER_RETRIES' default


async def _fresh_pool(pg_url: str) -> asyncpg.Pool:
    name = "bench_batches_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(pg_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    pool = await create_pool(pg_url.rsplit("/", 1)[0] + "/" + name, 2)
    await migrate(pool)
    return pool


def _messages(contacts: Sequence[str], tag: str, poison_at: int = -1) -> list[InboundMessage]:
    now = datetime.now(UTC)
    return [
        InboundMessage(
            event_id=f"bench:{tag}:{contact}",
            channel_id="bench",
            contact_id=contact,
            provider="generic",
            provider_message_id=f"{tag}-{contact}",
            # Postgres text cannot hold NUL: a non-transient failure, like a real poison event
            text="poison \x00" if i == poison_at else "still there?",
            sent_at=now,
            received_at=now,
        )
        for i, contact in enumerate(contacts)
    ]


async def _apply(pool: asyncpg.Pool, events: Sequence[InboundMessage]) -> None:
    async with pool.acquire() as conn:
        await apply_batch(conn, events, POLICY, 8)


async def per_event_by_batch_size(pg_url: str, sizes: Sequence[int], total: int = 30_000) -> dict[int, float]:
    """Median microseconds per event to apply a batch of one message per open conversation,
    over enough batches of each size to apply `total` events (at least 3): one batch of 10
    takes a few ms, which a shared box's noise would swamp."""
    pool = await _fresh_pool(pg_url)
    try:
        result: dict[int, float] = {}
        for size in sizes:
            contacts = [f"s{size}-{i}" for i in range(size)]
            await _apply(pool, _messages(contacts, "open"))
            times = []
            for r in range(max(3, total // size)):
                events = _messages(contacts, f"r{r}")
                start = time.perf_counter()
                await _apply(pool, events)
                times.append(time.perf_counter() - start)
            result[size] = 1e6 * statistics.median(times) / size
        return result
    finally:
        await pool.close()


async def poison_cost(pg_url: str, size: int = 1000) -> tuple[float, float, float]:
    """Seconds to get a batch of `size` past: clean, with one poison event found by bisection
    (the worker today), and with the whole batch retried then replayed event by event (before)."""
    logging.getLogger("agents.runner").setLevel(logging.CRITICAL)  # the retries would flood stdout
    pool = await _fresh_pool(pg_url)
    try:
        contacts = [f"p{i}" for i in range(size)]
        await _apply(pool, _messages(contacts, "open"))
        parked: list[InboundMessage] = []

        async def park(event: InboundMessage, exc: BaseException) -> None:
            parked.append(event)

        async def apply(items: Sequence[InboundMessage]) -> None:
            retries = RETRIES if len(items) == 1 else 0  # as LifecycleAgent._apply_and_arm
            await with_retries(lambda: _apply(pool, items), retries=retries, what="bench batch")

        start = time.perf_counter()
        await apply_isolating(_messages(contacts, "clean"), apply, park)
        clean = time.perf_counter() - start

        start = time.perf_counter()
        await apply_isolating(_messages(contacts, "bisect", poison_at=size // 3), apply, park)
        bisect = time.perf_counter() - start
        assert len(parked) == 1

        # Before: the batch was retried RETRIES times (backoff from 50 ms), then every event
        # was applied in its own transaction, the poison one retried the same way.
        async def old_retries(items: Sequence[InboundMessage]) -> None:
            delay = 0.05
            for attempt in range(RETRIES + 1):
                try:
                    await _apply(pool, items)
                    return
                except asyncpg.PostgresError:
                    if attempt == RETRIES:
                        raise
                    await asyncio.sleep(delay)
                    delay *= 2

        events = _messages(contacts, "before", poison_at=size // 3)
        start = time.perf_counter()
        try:
            await old_retries(events)
        except asyncpg.PostgresError:
            for event in events:
                with contextlib.suppress(asyncpg.PostgresError):
                    await old_retries([event])
        before = time.perf_counter() - start
        return clean, bisect, before
    finally:
        await pool.close()


_EVENT_TYPES = "uuid text text text text text text int timestamptz".split()
_BY_ARRAYS = (
    "INSERT INTO encoding_probe SELECT a, b, c, d, e, f, g, h, i FROM unnest("
    + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_EVENT_TYPES, 1))
    + ") WITH ORDINALITY AS u(a, b, c, d, e, f, g, h, i, n) ORDER BY n"
)


async def encoding(pg_url: str, rows: int = 1000, rounds: int = 20) -> dict[str, tuple[float, float]]:
    """The same 1,000 audit rows inserted as one array parameter per column (asyncpg encodes each
    value) and as one JSON parameter (streams/jsonrows.py): client CPU and wall us per row."""
    pool = await _fresh_pool(pg_url)
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "CREATE TABLE encoding_probe (conversation_id uuid, event_id text, kind text,"
                " from_state text, to_state text, cause text, detail text, version int,"
                " occurred_at timestamptz)"
            )
            now = datetime.now(UTC)
            batch = [
                (str(uuid.uuid4()), f"e{i}", "transition", "open", "open", "message:x", None, i, now)
                for i in range(rows)
            ]
            by_json = (
                "INSERT INTO encoding_probe SELECT a, b, c, d, e, f, g, h, i"
                f" FROM ({jsonrows.select(_EVENT_TYPES)}) AS u(a, b, c, d, e, f, g, h, i, n) ORDER BY n"
            )
            found: dict[str, tuple[float, float]] = {}
            for name in ("arrays", "json") * 2:  # the second pass is the one kept (warm)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for _ in range(rounds):
                    if name == "arrays":
                        await conn.execute(_BY_ARRAYS, *[[r[i] for r in batch] for i in range(9)])
                    else:
                        await conn.execute(by_json, jsonrows.dumps(batch))
                n = rows * rounds
                found[name] = (
                    1e6 * (time.process_time() - cpu0) / n,
                    1e6 * (time.perf_counter() - wall0) / n,
                )
            return found
    finally:
        await pool.close()
