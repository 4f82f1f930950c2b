"""`parley replay`: drop the projection, replay the topic, get identical rows."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg

from domain.lifecycle import CloseReason
from streams.records import OutboundMessage, StatusReceipt
from tests.integration.harness import Deployment, GenericChannel, wait_until
from tests.integration.lifecycle_helpers import Thread, now

DEPLOYMENT_ENV = {"PARLEY_TIMEOUT_IDLE": "2", "PARLEY_TIMEOUT_WAITING_CLOSE": "1"}

SNAPSHOT = {
    "conversations": "SELECT id, channel_id, contact_id, state, version, opened_at, updated_at, deadline_at,"
    " close_reason, closed_at, previous_conversation_id, assigned_agent, pending_close_reason,"
    " state_before_close, window_expires_at FROM conversations ORDER BY id",
    # ids and created_at are insert-time artefacts (bigserial, clock_timestamp); the rest must match
    "messages": "SELECT conversation_id, channel_id, provider_message_id, direction, type, text, payload,"
    " status, sent_at, status_at FROM messages ORDER BY channel_id, direction, provider_message_id",
    "conversation_events": "SELECT conversation_id, event_id, kind, from_state, to_state, cause, detail,"
    " version, occurred_at FROM conversation_events"
    " ORDER BY conversation_id, event_id, kind, version, detail",
    "message_receipts": "SELECT event_id, channel_id, provider_message_id, provider_status, status,"
    " provider_at, errors, applied FROM message_receipts ORDER BY event_id",
    "processed_events": "SELECT event_id FROM processed_events ORDER BY event_id",
}


async def _snapshot(db: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {name: [dict(r) for r in await db.fetch(sql)] for name, sql in SNAPSHOT.items()}


def _replay(dep: Deployment, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "parley.cli", "replay", *args],
        env=dep.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


async def test_replay_rebuilds_identical_rows(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    threads = [Thread(deployment, channel.id) for _ in range(12)]
    t0 = now()
    for i, t in enumerate(threads):
        await t.produce(
            t.message("oi", t0, "a"), t.message("preciso de ajuda", t0 + timedelta(seconds=1), "b")
        )
        if i % 3 == 0:
            await t.produce(t.message("obrigado, pode fechar", t0 + timedelta(seconds=2), "bye"))
    first = threads[1]
    [conv] = await first.wait(db, "a conversation", lambda c: len(c) == 1)
    out = OutboundMessage(
        event_id="outbound:x",
        channel_id=channel.id,
        contact_id=first.contact_id,
        conversation_id=conv["id"],
        provider_message_id=f"{first.contact_id}:out",
        text="olá!",
        sent_at=t0 + timedelta(seconds=3),
    )
    receipt = StatusReceipt(
        event_id="status:x",
        channel_id=channel.id,
        contact_id=first.contact_id,
        provider="generic",
        provider_message_id=f"{first.contact_id}:out",
        provider_status="read",
        provider_at=t0 + timedelta(seconds=4),
        received_at=t0 + timedelta(seconds=4),
    )
    await first.produce(receipt, out)  # the receipt first: it must wait for its message
    await first.produce(first.close(conv, t0 + timedelta(seconds=5), CloseReason.AGENT_CLOSED))

    async def settled() -> bool:
        open_: int = await db.fetchval("SELECT count(*) FROM conversations WHERE state <> 'closed'")
        total: int = await db.fetchval("SELECT count(*) FROM conversations")
        read: int = await db.fetchval("SELECT count(*) FROM messages WHERE status = 'read'")
        return open_ == 0 and total == len(threads) and read == 1

    await wait_until(settled, 60, "every conversation closed by its timer or command")
    deployment.stop("worker")
    before = await _snapshot(db)
    assert {r["close_reason"] for r in before["conversations"]} >= {"expired", "agent_closed", "user_closed"}

    await db.execute(
        "TRUNCATE conversations, messages, conversation_events, processed_events,"
        " message_receipts RESTART IDENTITY CASCADE"
    )
    out1 = _replay(deployment)
    assert await _snapshot(db) == before
    assert "applied" in out1

    out2 = _replay(deployment)  # idempotent: everything is already applied
    assert await _snapshot(db) == before
    assert " 0 applied" in out2, out2

    # One conversation: its thread is rebuilt from its own events only.
    target = before["conversations"][0]
    await db.execute(
        "UPDATE conversations SET state = 'idle', close_reason = NULL WHERE id = $1", target["id"]
    )
    out3 = _replay(deployment, "--conversation", str(target["id"]))
    assert await _snapshot(db) == before, out3
    deployment.start("worker")


def _replay_run(dep: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parley.cli", "replay", *args],
        env=dep.env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_replaying_a_thread_keeps_conversations_past_retention(
    http: aiohttp.ClientSession, deployment: Deployment, channel: GenericChannel, db: asyncpg.Connection
) -> None:
    """A thread whose first conversation's events are gone from the topic (past retention; here
    its rows are written straight to Postgres, with no events at all): rebuilding the thread's
    newer conversation must not destroy the old one, nor the link to it."""
    if "worker" not in deployment.processes:
        deployment.start("worker")
    await deployment.wait_ready(http)
    t = Thread(deployment, channel.id)
    old_id = str(uuid.uuid4())
    long_ago = now() - timedelta(days=30)
    await db.execute(
        "INSERT INTO conversations (id, channel_id, contact_id, state, version, opened_at, updated_at,"
        " close_reason, closed_at, thread_seq)"
        " VALUES ($1, $2, $3, 'closed', 3, $4, $5, 'agent_closed', $5, 1)",
        old_id,
        channel.id,
        t.contact_id,
        long_ago,
        long_ago + timedelta(hours=1),
    )
    await db.execute(
        "INSERT INTO messages (conversation_id, channel_id, contact_id, provider_message_id, direction, type,"
        " text, status, sent_at) VALUES ($1, $2, $5, $3, 'inbound', 'text', 'old news', 'received', $4)",
        old_id,
        channel.id,
        f"{t.contact_id}:old",
        long_ago,
        t.contact_id,
    )
    await db.execute(
        "INSERT INTO conversation_events (conversation_id, event_id, kind, from_state, to_state, cause,"
        " version, occurred_at) VALUES ($1, 'gone:1', 'closed', 'processing', 'closed', 'command:x', 3, $2)",
        old_id,
        long_ago + timedelta(hours=1),
    )
    await t.produce(t.message("voltei", now(), "new"))
    convs = await t.wait(
        db,
        "the new conversation, closed by its timer",
        lambda c: len(c) == 2 and c[1]["state"] == "closed",
        60,
    )
    new_id = convs[1]["id"]
    assert convs[1]["previous_conversation_id"] == old_id
    deployment.stop("worker")
    try:
        before = await _snapshot(db)

        dry = _replay_run(deployment, "--conversation", new_id, "--dry-run")
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert new_id in dry.stdout and "would delete" in dry.stdout and old_id in dry.stdout, dry.stdout
        assert await _snapshot(db) == before  # a dry run changes nothing

        refused = _replay_run(deployment, "--conversation", old_id)
        assert refused.returncode == 2 and "cannot be rebuilt" in refused.stderr, refused.stderr[-3000:]
        assert await _snapshot(db) == before

        await db.execute("UPDATE conversations SET close_reason = 'failed' WHERE id = $1", new_id)
        out = _replay_run(deployment, "--conversation", new_id)
        assert out.returncode == 0, out.stderr[-3000:]
        assert await _snapshot(db) == before, out.stdout  # rebuilt; the old one and its link intact
    finally:
        deployment.start("worker")
