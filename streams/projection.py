"""Applies a batch of conversation events to Postgres: read, plan, then write all or nothing.

The processed_events ledger makes redelivered events no-ops; conversation updates are
conditional on the version read at the start of the batch, so a second writer (a zombie worker
after a rebalance) loses instead of overwriting. The common batch (messages, agent commands,
timer firings) is two round trips: the read, and one statement that claims and writes it all.
The decisions are made by the pure planner (streams.plan); this module is only the reads and
writes, each a named SQL statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from domain.actions import Action, Arm, last_per_action
from domain.lifecycle import CloseReason, Conversation, Emit, State
from domain.policy import LifecyclePolicy
from streams import jsonrows
from streams.outgoing import insert_outbox, outbox_rows
from streams.plan import Current, Plan, Planner, Thread
from streams.receipts import apply_receipts
from streams.records import SCHEDULE_RECORDS, ConversationEvent
from streams.schedules_db import read_schedules, write_schedules
from streams.sends_db import Send, queue_sends, settle_from_receipts
from streams.topics import partitioner

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class StaleVersion(Exception):
    """A conversation changed under us since the batch read it; the batch must be retried."""


@dataclass
class BatchResult:
    """What a batch did, for the agent to act on after the commit."""

    applied: int = 0
    duplicates: int = 0
    actions: list[Action] = field(default_factory=list)
    emits: list[Emit] = field(default_factory=list)
    outbox: int = 0  # outgoing events written (the relay can be woken when > 0)
    queued: list[Send] = field(default_factory=list)  # sends queued for the sender (outbox: <prefix>.sends)


def _conversation(row: asyncpg.Record) -> Conversation:
    def opt_state(v: str | None) -> State | None:
        return State(v) if v else None

    def opt_reason(v: str | None) -> CloseReason | None:
        return CloseReason(v) if v else None

    prev = row["previous_conversation_id"]
    return Conversation(
        id=str(row["id"]),
        channel_id=row["channel_id"],
        contact_id=row["contact_id"],
        state=State(row["state"]),
        version=row["version"],
        opened_at=row["opened_at"],
        updated_at=row["updated_at"],
        deadline_at=row["deadline_at"],
        close_reason=opt_reason(row["close_reason"]),
        closed_at=row["closed_at"],
        previous_conversation_id=str(prev) if prev else None,
        assigned_agent=row["assigned_agent"],
        pending_close_reason=opt_reason(row["pending_close_reason"]),
        state_before_close=opt_state(row["state_before_close"]),
    )


_CONV_COLUMNS = (
    "id, channel_id, contact_id, state, version, opened_at, updated_at, deadline_at,"
    " close_reason, closed_at, previous_conversation_id, assigned_agent,"
    " pending_close_reason, state_before_close, window_expires_at, thread_seq"
)
_CONV_TYPES = (
    "uuid text text text int timestamptz timestamptz timestamptz text timestamptz uuid text text text"
    " timestamptz bigint"
).split()


# Every batched statement reads its rows from one JSON parameter (streams/jsonrows.py).
def _insert_conversations(param: int) -> str:
    return (
        f"INSERT INTO conversations ({_CONV_COLUMNS})"
        f" SELECT {_CONV_COLUMNS} FROM ({jsonrows.select(_CONV_TYPES, param)}) AS u({_CONV_COLUMNS}, n)"
    )


# One row source carries the new values and the version each row was read at, so the statement
# is one scan joined to conversations by primary key: linear in the batch. (It used to join two
# unnests by id, a nested loop: 1,000 rows cost 999,000 join-filter rejections, 0.4-0.9 s.)
def _update_conversations(param: int) -> str:
    return f"""
UPDATE conversations c SET
  state = u.state, version = u.version, updated_at = u.updated_at, deadline_at = u.deadline_at,
  close_reason = u.close_reason, closed_at = u.closed_at, assigned_agent = u.assigned_agent,
  pending_close_reason = u.pending_close_reason, state_before_close = u.state_before_close,
  window_expires_at = GREATEST(u.window_expires_at, c.window_expires_at)
FROM ({jsonrows.select([*_CONV_TYPES, "int"], param)}) AS u({_CONV_COLUMNS}, expected, n)
WHERE c.id = u.id AND c.version = u.expected
RETURNING c.id
"""


_MESSAGE_TYPES = "uuid text text text text text jsonb timestamptz".split()


def _insert_messages(param: int) -> str:
    return f"""
INSERT INTO messages (conversation_id, channel_id, contact_id, provider_message_id, direction, type,
                      text, payload, status, sent_at)
SELECT m.conversation_id, m.channel_id, m.contact_id, m.provider_message_id, 'inbound', m.type,
       m.text, m.payload, 'received', m.sent_at
FROM ({jsonrows.select(_MESSAGE_TYPES, param)})
  AS m(conversation_id, channel_id, contact_id, provider_message_id, type, text, payload, sent_at, n)
ORDER BY m.n
ON CONFLICT (channel_id, direction, contact_id, provider_message_id) DO NOTHING
"""


_EVENT_TYPES = "uuid text text text text text text int timestamptz".split()


def _insert_events(param: int) -> str:
    return f"""
INSERT INTO conversation_events (conversation_id, event_id, kind, from_state, to_state, cause,
                                 detail, version, occurred_at)
SELECT a, b, c, d, e, f, g, h, i
FROM ({jsonrows.select(_EVENT_TYPES, param)}) AS u(a, b, c, d, e, f, g, h, i, n)
ORDER BY n
"""


# The ledger claim: the events' ids not recorded before come back (ids of one batch are distinct).
def _claim(param: int) -> str:
    return f"""
INSERT INTO processed_events (event_id) SELECT e.v FROM ({jsonrows.values(param)}) AS e(v, n)
ON CONFLICT DO NOTHING RETURNING 1
"""


def _conversation_row(conv: Conversation, window: Any, seq: int) -> tuple[Any, ...]:
    return (
        conv.id,
        conv.channel_id,
        conv.contact_id,
        conv.state.value,
        conv.version,
        conv.opened_at,
        conv.updated_at,
        conv.deadline_at,
        conv.close_reason.value if conv.close_reason else None,
        conv.closed_at,
        conv.previous_conversation_id,
        conv.assigned_agent,
        conv.pending_close_reason.value if conv.pending_close_reason else None,
        conv.state_before_close.value if conv.state_before_close else None,
        window,
        seq,
    )


# The durable intent of every action (see domain/actions.py), sorted by key: rows locked in order.
def _arm(param: int) -> str:
    return f"""
INSERT INTO scheduled_actions (owner, name, token, due_at, partition)
SELECT owner, name, token, due_at, partition
FROM ({jsonrows.select("text text text timestamptz int".split(), param)})
  AS a(owner, name, token, due_at, partition, n)
ON CONFLICT (owner, name) DO UPDATE
  SET token = EXCLUDED.token, due_at = EXCLUDED.due_at, partition = EXCLUDED.partition
"""


def _disarm(param: int) -> str:
    return f"""
DELETE FROM scheduled_actions a
USING ({jsonrows.select(["text", "text"], param, probe=True)}) AS d(owner, name, n)
WHERE a.owner = d.owner AND a.name = d.name
"""


# Before planning, one round trip and no lock: which of the events the ledger has applied before
# (when asked: see apply_batch), and each thread's current conversation -- the highest thread_seq
# (log order, never a wall clock; the open one, if any, always has it), one index probe per
# thread, as whole rows of the table's type. Threads of events that turn out to be duplicates
# are read too (harmless: the planner never asks for them). The write claims the events and
# checks what it read. (`= ANY` of an array: one index probe per id; `IN (SELECT ...)` became a
# hash join over the whole ledger.)
_READ = f"""
SELECT ARRAY(
         SELECT p.event_id FROM processed_events p
         WHERE p.event_id = ANY (ARRAY(SELECT e.v FROM ({jsonrows.values(1)}) AS e(v, n)))
       ) AS seen,
       ARRAY(
         SELECT l.c FROM ({jsonrows.select(["text", "text"], 2)}) AS t(channel_id, contact_id, n)
         CROSS JOIN LATERAL (
           SELECT c FROM conversations c
           WHERE c.channel_id = t.channel_id AND c.contact_id = t.contact_id
           ORDER BY c.thread_seq DESC LIMIT 1
         ) l
       ) AS current
"""


async def _read(
    conn: Conn, events: Sequence[ConversationEvent], probe: bool
) -> tuple[list[ConversationEvent], dict[Thread, Current]]:
    """The events to apply, in order (a duplicate inside the batch applies once; with `probe`,
    the ones the ledger has are left out), and the current conversation of every thread the
    batch names."""
    threads = sorted({(e.channel_id, e.contact_id) for e in events if not isinstance(e, SCHEDULE_RECORDS)})
    ids = [e.event_id for e in events] if probe else []
    row = await conn.fetchrow(_READ, jsonrows.dumps(ids), jsonrows.dumps(threads))
    assert row is not None  # an aggregate query always has its one row
    seen = set(row["seen"])
    todo = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            todo.append(event)
    current = {
        (r["channel_id"], r["contact_id"]): Current(_conversation(r), r["thread_seq"]) for r in row["current"]
    }
    return todo, current


def action_rows(actions: list[Action], partition: Callable[[str], int]) -> tuple[list[Any], list[Any]]:
    """The last decision per (owner, name), sorted by key: (rows to arm, (owner, name) to disarm)."""
    last = sorted(last_per_action(actions).items())
    arms = [(a.owner, a.name, a.token, a.due_at, partition(a.owner)) for _, a in last if isinstance(a, Arm)]
    disarms = [(a.owner, a.name) for _, a in last if not isinstance(a, Arm)]
    return arms, disarms


# The batch's writes. $1/$2: how many events it claims and conversations it updates; the claim
# and the conversations, their messages and audit log ($3-$7), then its actions' durable intent
# (rows locked in key order) and its outgoing events in order ($8-$10; the relay publishes a
# partition's rows in id order). Data-modifying CTEs run once each, whether read or not; foreign
# keys are checked at the end of the statement, so a message may belong to a conversation
# inserted beside it. parley_batch_check (migration 0018) fails the statement when another writer
# claimed an event or changed a conversation since _read: the batch rolls back and is retried.
_UPDATE_CONVERSATIONS = _update_conversations(1)  # the busiest statement, alone (its EXPLAIN is tested)
_CONVERSATION_CTES = f"""
claimed AS ({_claim(3)}),
inserted AS ({_insert_conversations(4)} RETURNING 1),
updated AS ({_update_conversations(5)}),
messages AS ({_insert_messages(6)} RETURNING 1),
audit AS ({_insert_events(7)} RETURNING 1)"""
_CHECK = "SELECT parley_batch_check((SELECT count(*) FROM claimed), $1, (SELECT count(*) FROM updated), $2)"


def _effect_ctes(first: int) -> str:
    return f"""
armed AS ({_arm(first)} RETURNING 1),
disarmed AS ({_disarm(first + 1)} RETURNING 1),
outboxed AS ({insert_outbox(first + 2)} RETURNING 1)"""


_WRITE_ALL = f"WITH {_CONVERSATION_CTES},{_effect_ctes(8)}\n{_CHECK}"
_WRITE_CONVERSATIONS = f"WITH {_CONVERSATION_CTES}\n{_CHECK}"
_WRITE_EFFECTS = f"WITH {_effect_ctes(1)}\nSELECT 1"


async def _checked(conn: Conn, sql: str, *args: Any) -> None:
    try:
        await conn.fetchval(sql, *args)
    except asyncpg.exceptions.SerializationError as exc:
        if "parley: stale batch" in str(exc):
            raise StaleVersion(str(exc)) from exc
        raise


async def _write(conn: Conn, plan: Plan, partitions: int, events: Sequence[ConversationEvent]) -> int:
    """Write the plan; returns how many outgoing events went to the outbox."""
    partition = partitioner(partitions)
    rows_in = [_conversation_row(c, plan.windows.get(c.id), plan.seq[c.id]) for c in plan.inserts]
    rows_up = [
        (*_conversation_row(c, plan.windows.get(c.id), plan.seq[c.id]), read) for c, read in plan.updates
    ]
    conversations = (
        len(events),
        len(plan.updates),
        jsonrows.dumps([e.event_id for e in events]),
        jsonrows.dumps(rows_in),
        jsonrows.dumps(rows_up),
        jsonrows.dumps(plan.messages),
        jsonrows.dumps(plan.audit),
    )
    arms, disarms = action_rows(plan.actions, partition)
    if not (plan.receipts or plan.outbound or plan.sends or plan.schedules):
        # The common batch (messages, agent commands, timer firings): one statement, which is its
        # own transaction: one round trip, no BEGIN and COMMIT of their own.
        outbox = outbox_rows(plan.outbox, partition)
        await _checked(
            conn,
            _WRITE_ALL,
            *conversations,
            jsonrows.dumps(arms),
            jsonrows.dumps(disarms),
            jsonrows.dumps(outbox),
        )
        return len(outbox)
    async with conn.transaction():
        await _checked(conn, _WRITE_CONVERSATIONS, *conversations)
        if plan.receipts:  # sends in doubt: the provider took them
            await settle_from_receipts(conn, plan.receipts, partitions)
        pending = plan.outbox
        if plan.outbound or plan.receipts:
            position = {e.event_id: i for i, e in enumerate(events)}
            statuses = await apply_receipts(conn, plan.outbound, plan.receipts, position)
            if statuses:  # into log order among the conversation events (a stable sort)
                pending = sorted([*pending, *statuses], key=lambda row: row.position)
        if plan.sends:
            plan.queued = await queue_sends(conn, plan.sends, partitions)
        if plan.schedules and not await write_schedules(conn, plan.schedules):
            raise StaleVersion("a schedule changed under us")
        pending = [*pending, *plan.schedules.outbox] if plan.schedules.outbox else pending
        if arms or disarms or pending:
            await conn.execute(
                _WRITE_EFFECTS,
                jsonrows.dumps(arms),
                jsonrows.dumps(disarms),
                jsonrows.dumps(outbox_rows(pending, partition)),
            )
    return len(pending)


async def apply_batch(
    conn: Conn, events: Sequence[ConversationEvent], policy: LifecyclePolicy, partitions: int
) -> BatchResult:
    """Apply events (in order), all or nothing; raises StaleVersion if another writer won.

    Read (no lock), plan (streams.plan), write: the writes claim the events in the ledger and
    update conversations only at the version read, so a second writer (a zombie worker after a
    rebalance) makes the batch fail and retry instead of overwriting. `partitions` is the topics'
    partition count: each action row records its owner's partition, each outbox row its key's.

    Almost every batch is new to the ledger, so the first try does not ask it (one index probe
    per event saved); a redelivered batch finds out at its claim, which fails the write, and goes
    again with the ledger's answer. Inside a caller's transaction a failed statement would abort
    it: there the ledger is asked first.
    """
    if not conn.is_in_transaction():
        try:
            return await _apply(conn, events, policy, partitions, probe=False)
        except StaleVersion:
            pass  # a redelivery, or another writer: read again, this time with the ledger
    return await _apply(conn, events, policy, partitions, probe=True)


async def _apply(
    conn: Conn, events: Sequence[ConversationEvent], policy: LifecyclePolicy, partitions: int, probe: bool
) -> BatchResult:
    todo, current = await _read(conn, events, probe)
    result = BatchResult(duplicates=len(events) - len(todo))
    if not todo:
        return result
    keys = [e.key for e in todo if isinstance(e, SCHEDULE_RECORDS)]
    planner = Planner(current, policy, await read_schedules(conn, keys))
    for i, event in enumerate(todo):
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the timer loop and the fetcher run between chunks
        planner.add(event)
    plan = planner.finish()
    result.outbox = await _write(conn, plan, partitions, todo)
    result.applied, result.actions, result.emits = plan.applied, plan.actions, plan.emits
    result.queued = plan.queued
    return result
