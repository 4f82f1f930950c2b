"""The sender's group commits probe outbound_sends by key however the table grew since their
statements were first prepared (streams/sends_db.CUSTOM_PLAN). auto_explain, sent to this
session as notices, shows the plan each execution really used."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from streams import sends_db

_CONVERSATIONS = """
INSERT INTO conversations (id, channel_id, contact_id, state, version, opened_at, updated_at, thread_seq)
SELECT gen_random_uuid(), 'ch', $1::text || g, 'idle', 1, now(), now(), 1 FROM generate_series(1, $2::int) g
"""
_SENDS = """
INSERT INTO outbound_sends (id, conversation_id, channel_id, contact_id, partition, type, content, body_hash,
                            status, accepted_at, updated_at)
SELECT gen_random_uuid(), id, channel_id, contact_id, 0, 'text', '{"text": "hi"}', 'h', 'queued', now(), now()
FROM conversations WHERE contact_id LIKE $1::text || '%'
"""


async def _grow(conn: sends_db.Conn, tag: str, n: int) -> list[str]:
    await conn.execute(_CONVERSATIONS, tag, n)
    await conn.execute(_SENDS, tag)
    return [str(r[0]) for r in await conn.fetch("SELECT id FROM outbound_sends ORDER BY random() LIMIT 8")]


def _scans(plan: str) -> list[str]:
    return [line.strip() for line in plan.splitlines() if "Scan" in line]


async def test_the_group_commits_probe_the_key_after_the_table_grew(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        plans: list[str] = []

        def listen(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
            plans.append(str(message.message))

        conn.add_log_listener(listen)
        try:
            now = datetime.now(UTC)
            ids = await _grow(conn, "small", 5)
            # The same statement prepared the same way, run without the setting: the control.
            bare = await conn.prepare("/* without CUSTOM_PLAN */" + sends_db._LEAVING)
            for _ in range(8):  # Postgres settles on a generic plan after five executions
                await sends_db.mark_leaving(conn, [sends_db.Leaving(i, 1, now) for i in ids])
                await bare.fetch(ids, [1] * len(ids), [now] * len(ids))
            ids = await _grow(conn, "big", 20_000)  # no ANALYZE: autovacuum has not come yet
            await conn.execute(
                "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                " SET auto_explain.log_level = notice; SET client_min_messages = notice"
            )
            plans.clear()
            await sends_db.mark_leaving(conn, [sends_db.Leaving(i, 2, now) for i in ids])
            await bare.fetch(ids, [3] * len(ids), [now] * len(ids))
            updates = [p for p in plans if "Update on outbound_sends" in p]
            assert len(updates) == 2, plans
            mine, control = _scans(updates[0]), _scans(updates[1])
            assert any("Index Scan using outbound_sends_pkey" in s for s in mine), updates[0]
            assert not any("Seq Scan on outbound_sends" in s for s in mine), updates[0]
            assert any("Seq Scan on outbound_sends" in s for s in control), updates[1]  # the defect
        finally:
            conn.remove_log_listener(listen)
