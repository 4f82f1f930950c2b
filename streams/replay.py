"""`parley replay`: re-project Postgres from the retained conversation-events topic.

Reads the topic with a plain consumer (no group, nothing committed), from the beginning or from
a timestamp, up to the end offsets seen at start, and applies it through the same projection
the worker uses. Idempotent: events already applied are skipped by the ledger.

For one conversation (`--conversation`), only what the retained log can rebuild is deleted: the
thread's conversations opened by events still in the topic (their ids are uuid5 of the opening
event). Older ones, whose opening event is past retention, stay untouched with their rows, and
so do the links to them (the first rebuilt conversation's previous_conversation_id points to the
newest of them again, as the projection derives it). The thread's events are re-applied from
the first rebuilt conversation's opening event on; events before it, or naming a kept
conversation, keep their ledger entries (their effects are on rows that stay). A conversation
that cannot be rebuilt is refused (ReplayRefused). `dry_run` reports without changing anything.
Run it with the workers stopped, or on a fresh database: a running worker may apply the same
events concurrently (harmless, but the counts then mean less).
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from pydantic import ValidationError

from streams.projection import apply_batch
from streams.records import ConversationEvent, conversation_id_for, events_of
from streams.schema import create_pool, migrate
from streams.settings import Settings
from streams.topics import Topics, thread_key


@dataclass
class ReplayResult:
    """What a replay did."""

    read: int = 0
    applied: int = 0
    duplicates: int = 0
    undecodable: int = 0
    skipped_other_threads: int = 0
    deleted: list[str] = field(default_factory=list)  # conversations rebuilt (--conversation)
    kept: list[str] = field(default_factory=list)  # the thread's older conversations, untouched
    reapplied: int = 0  # events whose ledger entries were cleared to be applied again


class ReplayRefused(Exception):
    """The requested rebuild would destroy what the retained log cannot rebuild."""


Progress = Callable[[int, int], None]


def print_progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    filled = width * done // total if total else width
    end = "\r" if sys.stderr.isatty() and done < total else "\n"
    sys.stderr.write(f"replay [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} events{end}")


_DELETE_THREAD = [
    "DELETE FROM message_receipts WHERE (channel_id, provider_message_id) IN (SELECT channel_id,"
    " provider_message_id FROM messages WHERE conversation_id = ANY($1::uuid[]))",
    "DELETE FROM messages WHERE conversation_id = ANY($1::uuid[])",
    "DELETE FROM conversation_events WHERE conversation_id = ANY($1::uuid[])",
    "UPDATE conversations SET previous_conversation_id = NULL WHERE id = ANY($1::uuid[])",
    "DELETE FROM conversations WHERE id = ANY($1::uuid[])",
]


async def replay(
    settings: Settings,
    *,
    since: datetime | None = None,
    conversation_id: str | None = None,
    progress: Progress = print_progress,
    batch: int = 1000,
    dry_run: bool = False,
) -> ReplayResult:
    """Re-apply the topic to Postgres; returns the counts."""
    topic = Topics(settings.topic_prefix).conversation_events
    pool = await create_pool(settings.database_url, 2)
    consumer = plain_consumer(settings, batch)
    result = ReplayResult()
    try:
        if not dry_run:
            await migrate(pool)
        await consumer.start()
        partitions = await topic_partitions(consumer, topic)
        only_key: bytes | None = None
        if conversation_id is not None:
            row = await pool.fetchrow(
                "SELECT channel_id, contact_id FROM conversations WHERE id = $1", conversation_id
            )
            if row is None:
                raise LookupError(f"no conversation {conversation_id}")
            only_key = thread_key(row["channel_id"], row["contact_id"])
            partitions = [DefaultPartitioner()(only_key, partitions, partitions)]
        ranges = await assign_range(consumer, topic, partitions, since)
        total = sum(end - start for start, end in ranges.values())
        events: list[ConversationEvent] = []
        last_report = 0.0
        async for fetched in fetch_range(consumer, ranges, batch):
            for records in fetched.values():
                for record in records:
                    result.read += 1
                    if only_key is not None and record.key != only_key:
                        result.skipped_other_threads += 1
                        continue
                    try:
                        decoded = events_of(record.value)
                    except ValidationError:
                        result.undecodable += 1  # it was dead-lettered when first consumed
                        continue
                    if dry_run and only_key is None:
                        result.reapplied += len(decoded)  # a full dry run only counts
                    else:
                        events.extend(decoded)
            if conversation_id is not None or dry_run:
                continue  # one thread: collect everything first, then rebuild it at once
            await _apply(pool, events, settings, result)
            events.clear()
            if time.monotonic() - last_report > 0.5:
                progress(result.read, total)
                last_report = time.monotonic()
        if conversation_id is not None and only_key is not None:
            await _rebuild_thread(pool, only_key, conversation_id, events, settings, result, dry_run)
        progress(result.read, total)
        return result
    finally:
        await consumer.stop()
        await pool.close()


def plain_consumer(settings: Settings, batch: int = 1000) -> AIOKafkaConsumer:
    """A consumer with no group: it commits nothing and is no member of the workers' group."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=batch,
    )


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """The topic's partitions, sorted (fetching metadata on first use)."""
    found = consumer.partitions_for_topic(topic)
    if not found:
        await consumer._client.force_metadata_update()  # first use: metadata not fetched yet
        found = consumer.partitions_for_topic(topic) or set()
    return sorted(found)


async def assign_range(
    consumer: AIOKafkaConsumer,
    topic: str,
    partitions: list[int],
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[TopicPartition, tuple[int, int]]:
    """Assign the partitions and seek each to the range [since, until) by record timestamp (the
    beginning, and the end offsets seen now, when not given): partition -> (start, end)."""
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    end = await consumer.end_offsets(tps)
    start = await consumer.beginning_offsets(tps)
    if since is not None:
        found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        start = {tp: (found[tp].offset if found[tp] else end[tp]) for tp in tps}
    if until is not None:
        found = await consumer.offsets_for_times({tp: int(until.timestamp() * 1000) for tp in tps})
        end = {tp: (found[tp].offset if found[tp] else end[tp]) for tp in tps}
    for tp in tps:
        consumer.seek(tp, start[tp])
    return {tp: (start[tp], max(start[tp], end[tp])) for tp in tps}


async def fetch_range(
    consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]], batch: int = 1000
) -> AsyncIterator[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]:
    """The assigned range's records, one fetch at a time (records past a partition's end left
    out); ends when every partition reached its end."""
    pending = {tp for tp, (start, end) in ranges.items() if start < end}
    while pending:
        fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=batch)
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        for tp, records in fetched.items():
            end = ranges[tp][1]
            out[tp] = [r for r in records if r.offset < end]
            if records and records[-1].offset >= end - 1:
                pending.discard(tp)
        yield out


async def _apply(
    pool: asyncpg.Pool, events: list[ConversationEvent], settings: Settings, result: ReplayResult
) -> None:
    if not events:
        return
    async with pool.acquire() as conn:
        done = await apply_batch(conn, events, settings.policy(), settings.topic_partitions)
    result.applied += done.applied
    result.duplicates += done.duplicates


async def _rebuild_thread(
    pool: asyncpg.Pool,
    key: bytes,
    target: str,
    events: list[ConversationEvent],
    settings: Settings,
    result: ReplayResult,
    dry_run: bool,
) -> None:
    channel_id, _, contact_id = key.decode().partition("/")
    async with pool.acquire() as conn, conn.transaction():
        thread = [
            str(r["id"])
            for r in await conn.fetch(
                "SELECT id FROM conversations WHERE channel_id = $1 AND contact_id = $2"
                " ORDER BY opened_at, id FOR UPDATE",
                channel_id,
                contact_id,
            )
        ]
        opened_by = {conversation_id_for(e.event_id): i for i, e in enumerate(events)}
        rebuilt = [c for c in thread if c in opened_by]
        result.deleted = rebuilt
        result.kept = [c for c in thread if c not in opened_by]
        if target not in opened_by:
            raise ReplayRefused(
                f"conversation {target} was opened by an event that is no longer in the topic (past"
                f" PARLEY_TOPIC_RETENTION), so it cannot be rebuilt; nothing was changed"
            )
        first = min(opened_by[c] for c in rebuilt)
        kept = set(result.kept)
        # From the first rebuilt conversation's opening on; an event naming a kept conversation
        # (a late command or timer for it) stays applied to the row that stays.
        again = [e for e in events[first:] if getattr(e, "conversation_id", None) not in kept]
        result.reapplied = len(again)
        if dry_run:
            return
        for sql in _DELETE_THREAD:
            await conn.execute(sql, rebuilt)
        await conn.execute(
            "DELETE FROM processed_events WHERE event_id = ANY($1::text[])", [e.event_id for e in again]
        )
        done = await apply_batch(conn, events[first:], settings.policy(), settings.topic_partitions)
    result.applied += done.applied
    result.duplicates += done.duplicates
