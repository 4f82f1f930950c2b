"""The projection's batched statements against a real Postgres: linear plans, monotonic windows."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from domain.policy import LifecyclePolicy
from streams import jsonrows, projection, schedules_db
from streams.projection import _UPDATE_CONVERSATIONS, apply_batch
from streams.records import CloseCommand, InboundMessage
from tests.integration.harness import wait_until

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
POLICY = LifecyclePolicy(
    idle_timeout=timedelta(hours=1),
    processing_timeout=timedelta(hours=1),
    awaiting_confirmation_timeout=timedelta(minutes=10),
    waiting_close_timeout=timedelta(minutes=3),
    close_grace=timedelta(seconds=30),
    reopen_window=timedelta(0),
)


def inbound(contact: str, n: int, at: datetime, sent_at: datetime | None = None) -> InboundMessage:
    return InboundMessage(
        event_id=f"generic:ch:{contact}:{n}",
        channel_id="ch",
        contact_id=contact,
        provider="generic",
        provider_message_id=f"{contact}-{n}",
        text=f"message {n}",
        sent_at=sent_at or at,
        received_at=at,
    )


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


class Rollback(Exception):
    """Undo what EXPLAIN ANALYZE really did."""


async def _explained(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, sql: str, *args: Any
) -> dict[str, Any]:
    """The plan EXPLAIN ANALYZE reports for the statement, run and rolled back."""
    explained = ""
    with contextlib.suppress(Rollback):
        async with conn.transaction():
            explained = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
            raise Rollback
    plan: dict[str, Any] = json.loads(explained)[0]["Plan"]
    return plan


async def test_the_batched_update_is_linear_in_the_batch(pool: asyncpg.Pool) -> None:
    # One UPDATE of 1,000 rows out of a table the size of a real one.
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO conversations (id, channel_id, contact_id, state, version, opened_at,"
            " updated_at, deadline_at, thread_seq)"
            " SELECT gen_random_uuid(), 'ch', 'c' || n, 'idle', 1, $1::timestamptz, $1,"
            " $1 + interval '1 hour', 1"
            " FROM generate_series(1, 50000) AS n",
            T0,
        )
        await conn.execute("ANALYZE conversations")
        rows = await conn.fetch("SELECT * FROM conversations ORDER BY contact_id LIMIT 1000")
        cols = "id channel_id contact_id state version opened_at updated_at deadline_at close_reason".split()
        cols += "closed_at previous_conversation_id assigned_agent pending_close_reason".split()
        cols += "state_before_close window_expires_at thread_seq".split()
        # each row: its new values (the version one up) and the version it was read at
        batch = [(*[r[c] + 1 if c == "version" else r[c] for c in cols], r["version"]) for r in rows]
        # Under load the planner chose nested loops for the old statement (two unnests joined by
        # id: 999,000 join-filter rejections per 1,000 rows). Force nested loops: the statement's
        # shape, not the planner's mood, must keep it linear.
        await conn.execute("SET enable_hashjoin = off; SET enable_mergejoin = off")
        plan = await _explained(conn, _UPDATE_CONVERSATIONS, jsonrows.dumps(batch))
    removed = sum(node.get("Rows Removed by Join Filter", 0) for node in _nodes(plan))
    assert removed <= 1000, f"the join filter rejected {removed:,} rows for a 1,000-row batch"
    assert plan["Actual Rows"] == 1000  # and every row was updated


async def test_the_ledger_probe_reads_only_the_batch_ids(pool: asyncpg.Pool) -> None:
    # The read asks the ledger about a batch's ids; as `IN (SELECT ...)` the planner hashed
    # them and scanned the whole ledger (here 5,000 rows, not yet analyzed, as in a young
    # deployment), a cost growing with every event ever applied.
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO processed_events (event_id) SELECT 'old:' || n FROM generate_series(1, 5000) AS n"
        )
        ids = jsonrows.dumps([f"old:{n}" for n in range(1, 11)])
        nodes = _nodes(await _explained(conn, projection._READ, ids, jsonrows.dumps([])))
    ledger = [n for n in nodes if n.get("Relation Name") == "processed_events"]
    assert ledger, nodes
    assert all(n["Node Type"] != "Seq Scan" for n in ledger), ledger
    # the batch's rows, fetched by the key index (rows are per loop)
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in ledger) == 10


async def test_a_message_updates_its_conversation_in_place(pool: asyncpg.Pool) -> None:
    # The busiest write of all: each user message moves its conversation's deadline. No index
    # may cover the columns it changes, so the new row version stays on its page (a HOT update)
    # instead of adding an entry to each of the table's indexes (migration 0017).
    contacts = [f"hot{i}" for i in range(50)]
    stats = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'conversations'"
    async with pool.acquire() as conn, pool.acquire() as reader:
        await apply_batch(conn, [inbound(c, 1, T0) for c in contacts], POLICY, 8)  # opens them
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await reader.execute("SELECT pg_stat_clear_snapshot()")
        before = await reader.fetchrow(stats)
        assert before is not None
        updated0, hot0 = before
        for n in (2, 3, 4):  # a transaction per batch, as the worker does
            await apply_batch(conn, [inbound(c, n, T0 + timedelta(minutes=n)) for c in contacts], POLICY, 8)
        await conn.execute("SELECT pg_stat_force_next_flush()")  # counted when it goes idle

        async def counted() -> tuple[int, int] | None:
            await reader.execute("SELECT pg_stat_clear_snapshot()")
            now = await reader.fetchrow(stats)
            assert now is not None
            return (now[0] - updated0, now[1] - hot0) if now[0] - updated0 >= 150 else None

        updated, hot = await wait_until(counted, 10, "the updates in the table's statistics")
    assert updated == 150
    # The first round finds the freshly inserted pages full (their free space is 20%, not enough
    # for 50 new versions); later rounds reuse the space pruned from the versions before. Before
    # 0017 none was HOT.
    assert hot >= updated / 2, (
        f"only {hot} of {updated} conversation updates were HOT: is a changing column indexed?"
    )


async def test_the_service_window_never_moves_backwards(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await apply_batch(conn, [inbound("w", 1, T0 + timedelta(minutes=5))], POLICY, 8)
        # a later event whose provider clock says it was sent earlier (a delayed retry)
        await apply_batch(conn, [inbound("w", 2, T0 + timedelta(minutes=6), sent_at=T0)], POLICY, 8)
        # and one sent "in the future" by a provider clock ahead of ours: capped at receive time
        await apply_batch(
            conn, [inbound("w", 3, T0 + timedelta(minutes=7), sent_at=T0 + timedelta(days=3650))], POLICY, 8
        )
        window = await conn.fetchval("SELECT window_expires_at FROM conversations WHERE contact_id = 'w'")
    assert window == T0 + timedelta(minutes=7, hours=24)


async def test_a_thread_whose_events_carry_clocks_out_of_order_keeps_one_open_conversation(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        await apply_batch(conn, [inbound("k", 1, T0)], POLICY, 8)
        first = await conn.fetchval("SELECT id FROM conversations WHERE contact_id = 'k'")
        close = CloseCommand(
            event_id="cmd:1",
            channel_id="ch",
            contact_id="k",
            conversation_id=str(first),
            issued_at=T0 + timedelta(seconds=1),
        )
        await apply_batch(conn, [close], POLICY, 8)
        # taken by an API process whose clock is 30 s behind, then one on time, then behind again
        for n, skew in ((2, -30), (3, 2), (4, -29)):
            await apply_batch(conn, [inbound("k", n, T0 + timedelta(seconds=skew))], POLICY, 8)
        rows = await conn.fetch(
            "SELECT id, state, opened_at, thread_seq FROM conversations"
            " WHERE contact_id = 'k' ORDER BY thread_seq"
        )
        counts = await conn.fetch(
            "SELECT conversation_id, count(*) AS n FROM messages GROUP BY conversation_id ORDER BY n"
        )
    assert [r["state"] for r in rows] == ["closed", "idle"]
    assert rows[1]["opened_at"] >= T0 + timedelta(seconds=1)  # never before the close it follows
    assert {str(c["conversation_id"]): c["n"] for c in counts} == {
        str(rows[0]["id"]): 1,
        str(rows[1]["id"]): 3,
    }


async def test_a_column_added_under_a_running_worker_costs_a_retry_not_a_dead_letter(
    pool: asyncpg.Pool,
) -> None:
    # A rolling upgrade: a migration adds a column to conversations while a worker applies
    # batches on connections whose statements and row type asyncpg has cached.
    from agents.runner import with_retries

    async with pool.acquire() as conn:
        await apply_batch(conn, [inbound("alter", 1, T0)], POLICY, 8)  # caches the statements and type
        await conn.execute("ALTER TABLE conversations ADD COLUMN bench_probe int")
        try:
            result = await with_retries(
                lambda: apply_batch(conn, [inbound("alter", 2, T0 + timedelta(minutes=1))], POLICY, 8),
                retries=0,  # no retry for a non-transient failure: it would have been parked
                what="batch after ALTER TABLE",
            )
            assert result.applied == 1
        finally:
            await conn.execute("ALTER TABLE conversations DROP COLUMN bench_probe")


async def _interfere_after_read(
    monkeypatch: pytest.MonkeyPatch, pool: asyncpg.Pool, sql: str, times: int = 1
) -> None:
    """Another writer (a zombie worker) runs `sql` between the batch's read and its write, the
    first `times` times the batch reads."""
    read = projection._read
    left = [times]

    async def read_then_interfere(conn: Any, events: Any, probe: bool) -> Any:
        got = await read(conn, events, probe)
        if left[0] > 0:
            left[0] -= 1
            async with pool.acquire() as other:
                await other.execute(sql)
        return got

    monkeypatch.setattr(projection, "_read", read_then_interfere)


async def _thread(conn: Any, contact: str) -> tuple[int, int, int]:
    version = await conn.fetchval("SELECT version FROM conversations WHERE contact_id = $1", contact)
    messages = await conn.fetchval("SELECT count(*) FROM messages WHERE contact_id = $1", contact)
    claimed = await conn.fetchval(
        "SELECT count(*) FROM processed_events WHERE event_id LIKE $1", f"%:{contact}:%"
    )
    return version, messages, claimed


async def test_an_event_claimed_by_another_writer_after_the_read_is_applied_once(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The common batch is one statement with no transaction around it, planned without asking
    # the ledger: its claim comes up short, the statement (claim, conversation, messages) rolls
    # back, and the batch goes again knowing what the ledger has.
    async with pool.acquire() as conn:
        await apply_batch(conn, [inbound("z", 1, T0)], POLICY, 8)
        before = await _thread(conn, "z")
        batch = [inbound("z", n, T0 + timedelta(minutes=n)) for n in (2, 3)]
        await _interfere_after_read(
            monkeypatch, pool, "INSERT INTO processed_events (event_id) VALUES ('generic:ch:z:3')"
        )
        done = await apply_batch(conn, batch, POLICY, 8)
        assert (done.applied, done.duplicates) == (1, 1)
        # 3 is the other writer's: its message is not ours to store, and 2 is stored once
        assert await _thread(conn, "z") == (before[0] + 1, before[1] + 1, before[2] + 2)


async def test_a_redelivered_batch_applies_only_what_is_new(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await apply_batch(conn, [inbound("r", n, T0 + timedelta(minutes=n)) for n in (1, 2)], POLICY, 8)
        before = await _thread(conn, "r")
        again = [inbound("r", n, T0 + timedelta(minutes=n)) for n in (1, 2, 3)]
        done = await apply_batch(conn, again, POLICY, 8)
        assert (done.applied, done.duplicates) == (1, 2)
        assert await _thread(conn, "r") == (before[0] + 1, before[1] + 1, before[2] + 1)


async def test_a_conversation_changed_by_another_writer_after_the_read_fails_the_whole_write(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with pool.acquire() as conn:
        await apply_batch(conn, [inbound("y", 1, T0)], POLICY, 8)
        before = await _thread(conn, "y")
        bump = "UPDATE conversations SET version = version + 1 WHERE contact_id = 'y'"
        await _interfere_after_read(monkeypatch, pool, bump, times=2)  # the first try and the second
        with pytest.raises(projection.StaleVersion, match="won 0 of 1 conversation updates"):
            await apply_batch(conn, [inbound("y", 2, T0 + timedelta(minutes=2))], POLICY, 8)
        assert await _thread(conn, "y") == (before[0] + 2, before[1], before[2])  # nothing of the batch
        actions = await conn.fetchval("SELECT count(*) FROM scheduled_actions")
        assert actions == 1  # the first message's close deadline, not re-armed
        again = await apply_batch(conn, [inbound("y", 2, T0 + timedelta(minutes=2))], POLICY, 8)
        assert again.applied == 1
        assert await _thread(conn, "y") == (before[0] + 3, before[1] + 1, before[2] + 1)


async def test_batched_joins_probe_the_table_index_not_scan_the_table(pool: asyncpg.Pool) -> None:
    # A batch read by jsonb_array_elements is planned as 100 rows whatever it holds, so against a
    # table of some 20k rows the planner hashed the batch and scanned the whole table: 2.4 ms to
    # disarm 10 actions of 20,000, 1.4 ms to update 17 schedules of 10,000. These statements read
    # their batch with probe=True (migration 0019) and must probe the table's primary key.
    n = 20_000
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO scheduled_actions (owner, name, token, due_at, partition)"
            " SELECT 'ch/c' || n, 'close', 't', $1::timestamptz, n % 8 FROM generate_series(1, $2) AS n",
            T0,
            n,
        )
        await conn.execute(
            "INSERT INTO schedules (" + schedules_db._COLUMNS + ")"
            " SELECT 'k' || n, 'scheduled', 1, 1, $1::timestamptz, $1, 't', '{}', 1, 2000, NULL, 0, NULL,"
            " $1, $1, NULL, 1 FROM generate_series(1, $2) AS n",
            T0,
            n,
        )
        await conn.execute("ANALYZE")
        rows = await conn.fetch(
            "SELECT " + schedules_db._COLUMNS + " FROM schedules WHERE key IN ('k1', 'k2', 'k3')"
        )
        # each: its new values (payload as a JSON value, revision one up), and the revision read
        schedules = [(*list(r.values())[:7], {}, *list(r.values())[8:16], 2, 1) for r in rows]
        cases = {
            "scheduled_actions": (projection._disarm(1), [(f"ch/c{i}", "close") for i in range(1, 11)], 10),
            "schedules": (schedules_db._UPDATE, schedules, 3),
        }
        for table, (sql, batch, touched) in cases.items():
            plan = await _explained(conn, sql, jsonrows.dumps(batch))
            nodes = [x for x in _nodes(plan) if x.get("Relation Name") == table and "Scan" in x["Node Type"]]
            assert nodes and all(x["Node Type"] != "Seq Scan" for x in nodes), (table, nodes)
            assert sum(x["Actual Rows"] * x["Actual Loops"] for x in nodes) == touched, (table, nodes)
