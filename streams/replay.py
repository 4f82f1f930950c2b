"""`parley replay`: re-project Postgres from the retained conversation-events topic.

Reads the topic with a plain consumer (no group, nothing committed), from the beginning or from
a timestamp, up to the end offsets seen at start, and applies it through the same projection
the worker uses. Idempotent: events already applied are skipped by the ledger. For one
conversation, the thread's rows and ledger entries are deleted first and its events re-applied.
Run it with the workers stopped, or on a fresh database: a running worker may apply the same
events concurrently (harmless, but the counts then mean less).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from pydantic import ValidationError

from streams.projection import apply_batch
from streams.records import CONVERSATION_EVENT, ConversationEvent
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
) -> ReplayResult:
    """Re-apply the topic to Postgres; returns the counts."""
    topic = Topics(settings.topic_prefix).conversation_events
    pool = await create_pool(settings.database_url, 2)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        max_poll_records=batch,
    )
    result = ReplayResult()
    try:
        await migrate(pool)
        await consumer.start()
        partitions = sorted(consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
        only_key: bytes | None = None
        if conversation_id is not None:
            row = await pool.fetchrow(
                "SELECT channel_id, contact_id FROM conversations WHERE id = $1", conversation_id
            )
            if row is None:
                raise LookupError(f"no conversation {conversation_id}")
            only_key = thread_key(row["channel_id"], row["contact_id"])
            partitions = [DefaultPartitioner()(only_key, partitions, partitions)]
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        start = await consumer.beginning_offsets(tps)
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            start = {tp: (found[tp].offset if found[tp] else end[tp]) for tp in tps}
        for tp in tps:
            consumer.seek(tp, start[tp])
        total = sum(end[tp] - start[tp] for tp in tps)
        events: list[ConversationEvent] = []
        last_report = 0.0
        pending = {tp for tp in tps if start[tp] < end[tp]}
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=batch)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    result.read += 1
                    if only_key is not None and record.key != only_key:
                        result.skipped_other_threads += 1
                        continue
                    try:
                        events.append(CONVERSATION_EVENT.validate_json(record.value))
                    except ValidationError:
                        result.undecodable += 1  # it was dead-lettered when first consumed
                if records and records[-1].offset >= end[tp] - 1:
                    pending.discard(tp)
            if conversation_id is not None:
                continue  # one thread: collect everything first, then rebuild it at once
            await _apply(pool, events, settings, result)
            events.clear()
            if time.monotonic() - last_report > 0.5:
                progress(result.read, total)
                last_report = time.monotonic()
        if conversation_id is not None and only_key is not None:
            await _rebuild_thread(pool, only_key, events, settings, result)
        progress(result.read, total)
        return result
    finally:
        await consumer.stop()
        await pool.close()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # first use: metadata not fetched yet
    return consumer.partitions_for_topic(topic) or set()


async def _apply(
    pool: asyncpg.Pool, events: list[ConversationEvent], settings: Settings, result: ReplayResult
) -> None:
    if not events:
        return
    async with pool.acquire() as conn:
        done = await apply_batch(conn, events, settings.policy())
    result.applied += done.applied
    result.duplicates += done.duplicates


async def _rebuild_thread(
    pool: asyncpg.Pool, key: bytes, events: list[ConversationEvent], settings: Settings, result: ReplayResult
) -> None:
    channel_id, _, contact_id = key.decode().partition("/")
    async with pool.acquire() as conn, conn.transaction():
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM conversations WHERE channel_id = $1 AND contact_id = $2",
                channel_id,
                contact_id,
            )
        ]
        for sql in _DELETE_THREAD:
            await conn.execute(sql, ids)
        await conn.execute(
            "DELETE FROM processed_events WHERE event_id = ANY($1::text[])", [e.event_id for e in events]
        )
        done = await apply_batch(conn, events, settings.policy())
    result.applied += done.applied
    result.duplicates += done.duplicates
