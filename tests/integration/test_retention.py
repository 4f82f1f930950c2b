"""Retention (PARLEY_RETENTION_DAYS): the worker deletes conversations closed longer ago than that,
with their messages, receipts and audit rows, and unlinks their successors; it keeps the rest."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg

from agents.ledger import expire
from streams.schema import create_pool
from tests.integration.harness import Deployment, GenericChannel, message, wait_until
from tests.integration.lifecycle_helpers import now
from tests.integration.schedule_helpers import call
from tests.integration.worker_helpers import metrics

DEPLOYMENT_ENV = {"PARLEY_RETENTION_DAYS": "1", "PARLEY_LEDGER_PRUNE_INTERVAL": "1"}


async def _conversation(
    http: aiohttp.ClientSession, dep: Deployment, channel: GenericChannel, close: bool
) -> dict[str, Any]:
    contact = "ret-" + uuid.uuid4().hex[:8]
    raw, headers = channel.signed(message(uuid.uuid4().hex, contact, "hello"))
    async with http.post(f"{dep.base_url}/webhooks/generic/{channel.id}", data=raw, headers=headers) as r:
        assert r.status == 200, await r.text()

    async def found() -> list[Any]:
        _, page = await call(http, dep, "GET", f"/v1/conversations?contact={contact}")
        items: list[Any] = page["items"]
        return items

    [conv] = await wait_until(found, 30, f"{contact}'s conversation")
    if close:
        code, _ = await call(
            http, dep, "POST", f"/v1/conversations/{conv['id']}/close", {"reason": "agent_closed"}
        )
        assert code == 202

        async def closed() -> dict[str, Any] | None:
            _, body = await call(http, dep, "GET", f"/v1/conversations/{conv['id']}")
            return body if body["state"] == "closed" else None

        conv = await wait_until(closed, 30, "the conversation closed")
    result: dict[str, Any] = conv
    return result


async def _count(db: asyncpg.Connection, table: str, ids: list[str]) -> int:
    n: int = await db.fetchval(f"SELECT count(*) FROM {table} WHERE conversation_id = ANY($1::uuid[])", ids)
    return n


async def test_the_worker_deletes_conversations_closed_before_the_retention_and_keeps_the_rest(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    old_a, old_b, recent = [await _conversation(http, deployment, channel, close=True) for _ in range(3)]
    still_open = await _conversation(http, deployment, channel, close=False)
    old = [old_a["id"], old_b["id"]]
    kept = [recent["id"], still_open["id"]]
    provider_id = await db.fetchval(
        "SELECT provider_message_id FROM messages WHERE conversation_id = $1", old_a["id"]
    )
    await db.execute(
        "INSERT INTO message_receipts (event_id, channel_id, provider_message_id, provider_status,"
        " provider_at, applied) VALUES ($1, $2, $3, 'read', now(), true)",
        "receipt-" + uuid.uuid4().hex,
        channel.id,
        provider_id,
    )
    await db.execute(
        "UPDATE conversations SET previous_conversation_id = $1 WHERE id = $2", old_a["id"], still_open["id"]
    )
    assert await _count(db, "messages", old) == 2 and await _count(db, "conversation_events", old) >= 4
    # Closed two days ago, as far as retention can tell.
    await db.execute(
        "UPDATE conversations SET closed_at = now() - interval '2 days' WHERE id = ANY($1::uuid[])", old
    )

    async def expired() -> bool:
        left: int = await db.fetchval("SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[])", old)
        return left == 0

    await wait_until(expired, 30, "the old conversations deleted")
    assert await _count(db, "messages", old) == 0
    assert await _count(db, "conversation_events", old) == 0
    assert (
        await db.fetchval("SELECT count(*) FROM message_receipts WHERE provider_message_id = $1", provider_id)
        == 0
    )
    assert await db.fetchval("SELECT count(*) FROM conversations WHERE id = ANY($1::uuid[])", kept) == 2
    assert await _count(db, "messages", kept) == 2 and await _count(db, "conversation_events", kept) >= 3
    link = await db.fetchval(
        "SELECT previous_conversation_id FROM conversations WHERE id = $1", still_open["id"]
    )
    assert link is None
    assert (await metrics(http, deployment))["parley_retention_conversations_deleted_total"] >= 2


async def test_expiry_goes_in_chunks_oldest_first(deployment: Deployment, db: asyncpg.Connection) -> None:
    t = now()
    ids = [uuid.uuid4() for _ in range(7)]
    await db.executemany(
        "INSERT INTO conversations (id, channel_id, contact_id, state, version, opened_at, updated_at,"
        " closed_at, close_reason, thread_seq)"
        " VALUES ($1, 'chunked', $2, 'closed', 2, $3, $3, $3, 'agent_closed', 1)",
        [(i, f"c{n}", t - timedelta(hours=23 - n)) for n, i in enumerate(ids)],
    )
    pool = await create_pool(deployment.database_url, 2)
    try:
        # Closed within the day: the worker's own retention (1 day) leaves them alone. Everything
        # closed before 18.5 h ago: the first 5 (closed 23..19 h ago), 2 per chunk.
        gone = await expire(pool, t - timedelta(hours=18, minutes=30), chunk=2)
    finally:
        await pool.close()
    assert gone["conversations"] == 5
    left = {r["id"] for r in await db.fetch("SELECT id FROM conversations WHERE channel_id = 'chunked'")}
    assert left == set(ids[5:])
