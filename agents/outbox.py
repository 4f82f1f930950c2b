"""The outbox relay: unpublished `outbox` rows -> <prefix>.outgoing-events, then marked published.

Rows are written by the lifecycle agent in the transaction of the change that emitted them (a
schedule fired, ...), so an event exists exactly when its cause was committed. Every worker runs
this relay; each takes a small batch with `FOR UPDATE SKIP LOCKED` (no two relays publish the
same row at once), produces it (acks=all), marks it and commits. A crash between the produce and
the commit publishes the same rows again with the same `id`: delivery is at least once, and
receivers dedupe by id. Order per key holds within one relay's batches; with several workers two
events of one key may be published by different relays, so receivers must not rely on order.

Record: key = the source key (a schedule's key), value = {"type", "id", "timestamp", "data"}.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import faust
import orjson

log = logging.getLogger(__name__)

_TAKE = """
SELECT id, event_id, type, key, payload::text AS payload, created_at, topic FROM outbox
WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
"""
_MARK = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"


def outgoing_value(row: Any) -> bytes:
    """The record value of one outbox row."""
    return b"".join(
        [
            b'{"type":',
            orjson.dumps(row["type"]),
            b',"id":',
            orjson.dumps(row["event_id"]),
            b',"timestamp":',
            orjson.dumps(row["created_at"].isoformat()),
            b',"data":',
            row["payload"].encode(),  # jsonb as Postgres prints it: valid JSON, not re-parsed
            b"}",
        ]
    )


class OutboxRelay:
    """Publishes the outbox; `published` counts rows (re-publications included)."""

    def __init__(
        self,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        topic: faust.TopicT,
        *,
        batch: int = 500,
        idle: float = 0.1,
    ) -> None:
        self.pool = pool
        self.topic = topic
        self.topics: dict[str, faust.TopicT] = {}  # the outbox's `topic` column -> where it goes
        self.batch = batch
        self.idle = idle  # how long an empty outbox waits before looking again
        self.published = 0

    async def publish_once(self) -> int:
        """Publish one batch; returns how many rows."""
        pool = await self.pool()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_TAKE, self.batch)
            if not rows:
                return 0
            futures = [
                await self.topics.get(row["topic"], self.topic).send(
                    key=row["key"].encode(), value=outgoing_value(row)
                )
                for row in rows
            ]
            for fut in futures:
                await fut  # acks=all before the rows count as published
            await conn.execute(_MARK, [row["id"] for row in rows])
        self.published += len(rows)
        return len(rows)

    async def run(self) -> None:
        """Forever: publish while there is something, else look again after `idle`."""
        while True:
            try:
                n = await self.publish_once()
            except Exception as exc:  # noqa: BLE001 - Postgres or Kafka trouble: try again soon
                log.warning("outbox relay: %s: %s; retrying", type(exc).__name__, exc)
                n = 0
                await asyncio.sleep(1)  # back-off after a failure
            if n < self.batch:
                await asyncio.sleep(self.idle)  # polling an empty outbox
