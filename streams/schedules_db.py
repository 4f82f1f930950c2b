"""The IO half of a batch's schedule events: read the schedules, write the SchedulePlan.

Called by streams/projection.py inside the batch's transaction. Every statement is named here
and takes its batch's rows as one JSON parameter (streams/jsonrows.py: ~10x less worker CPU per
row than an array per column), read in one scan and joined to its table by primary key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import asyncpg
import orjson

from domain.schedules import Schedule, Status
from streams import jsonrows
from streams.schedules_plan import SchedulePlan

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

RESULTS_CHANNEL = "parley_schedule_results"  # NOTIFY payload: comma-separated command event ids
_NOTIFY_BYTES = 7900  # Postgres refuses a payload of 8,000 bytes or more

_COLUMNS = (
    "key, status, version, epoch, run_at, due_at, event_type, payload, max_attempts, backoff_ms,"
    " delay_ms, attempts, last_error, created_at, updated_at, fired_at, revision"
)
_TYPES = (
    "text text int bigint timestamptz timestamptz text json int bigint bigint int text timestamptz"
    " timestamptz timestamptz bigint"
).split()

_READ = f"SELECT {_COLUMNS} FROM schedules WHERE key = ANY($1::text[])"
_INSERT = f"""
INSERT INTO schedules ({_COLUMNS})
SELECT {_COLUMNS} FROM ({jsonrows.select(_TYPES)}) AS u({_COLUMNS}, n)
ON CONFLICT (key) DO NOTHING
RETURNING key
"""
# probe=True: one primary-key probe per row (without it, 17 rows against 10k schedules took
# 1.4 ms: a hash join over a scan of the whole table).
_UPDATE = f"""
UPDATE schedules s SET
  status = u.status, version = u.version, epoch = u.epoch, run_at = u.run_at, due_at = u.due_at,
  event_type = u.event_type, payload = u.payload, max_attempts = u.max_attempts,
  backoff_ms = u.backoff_ms, delay_ms = u.delay_ms, attempts = u.attempts,
  last_error = u.last_error, updated_at = u.updated_at, fired_at = u.fired_at, revision = u.revision
FROM ({jsonrows.select([*_TYPES, "bigint"], probe=True)}) AS u({_COLUMNS}, expected, n)
WHERE s.key = u.key AND s.revision = u.expected
RETURNING s.key
"""
_HISTORY = f"""
INSERT INTO schedule_history (key, version, kind, at, detail, event_id)
SELECT key, version, kind, at, detail, event_id
FROM ({jsonrows.select("text int text timestamptz text text".split())})
  AS h(key, version, kind, at, detail, event_id, n)
ORDER BY n
"""
_RESULTS = f"""
INSERT INTO schedule_results (event_id, status, body)
SELECT event_id, status, body
FROM ({jsonrows.select("text int json".split())}) AS r(event_id, status, body, n)
ON CONFLICT (event_id) DO NOTHING
"""
_NOTIFY = f"SELECT pg_notify('{RESULTS_CHANNEL}', $1)"


def schedule_of(row: asyncpg.Record) -> Schedule:
    """A schedules row as the domain's Schedule."""
    payload = row["payload"]
    return Schedule(
        key=row["key"],
        status=Status(row["status"]),
        version=row["version"],
        epoch=row["epoch"],
        run_at=row["run_at"],
        due_at=row["due_at"],
        event_type=row["event_type"],
        payload=orjson.loads(payload) if isinstance(payload, str | bytes) else payload,
        max_attempts=row["max_attempts"],
        backoff_ms=row["backoff_ms"],
        delay_ms=row["delay_ms"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        fired_at=row["fired_at"],
        revision=row["revision"],
    )


def _row(s: Schedule) -> tuple[Any, ...]:
    return (
        s.key,
        s.status.value,
        s.version,
        s.epoch,
        s.run_at,
        s.due_at,
        s.event_type,
        s.payload,
        s.max_attempts,
        s.backoff_ms,
        s.delay_ms,
        s.attempts,
        s.last_error,
        s.created_at,
        s.updated_at,
        s.fired_at,
        s.revision,
    )


async def read_schedules(conn: Conn, keys: Sequence[str]) -> dict[str, Schedule]:
    """The current rows of these keys (one `= ANY` probe)."""
    if not keys:
        return {}
    return {r["key"]: schedule_of(r) for r in await conn.fetch(_READ, sorted(set(keys)))}


def notify_chunks(ids: Sequence[str], limit: int = _NOTIFY_BYTES) -> Iterator[str]:
    """Comma-separated ids in payloads under Postgres' NOTIFY limit."""
    chunk: list[str] = []
    size = 0
    for event_id in ids:
        n = len(event_id.encode()) + 1
        if chunk and size + n > limit:
            yield ",".join(chunk)
            chunk, size = [], 0
        chunk.append(event_id)
        size += n
    if chunk:
        yield ",".join(chunk)


async def write_schedules(conn: Conn, plan: SchedulePlan) -> bool:
    """Write the plan but its outbox rows (the projection writes every outbox row in one
    statement); False when a schedule changed under us (the batch must be retried)."""
    if plan.inserts:
        won = await conn.fetch(_INSERT, jsonrows.dumps([_row(s) for s in plan.inserts]))
        if len(won) != len(plan.inserts):
            return False
    if plan.updates:
        rows = [(*_row(s), read) for s, read in plan.updates]
        won = await conn.fetch(_UPDATE, jsonrows.dumps(rows))
        if len(won) != len(plan.updates):
            return False
    if plan.history:
        await conn.execute(_HISTORY, jsonrows.dumps(plan.history))
    if plan.results:
        await conn.execute(_RESULTS, jsonrows.dumps(plan.results))
        for chunk in notify_chunks([r[0] for r in plan.results]):
            await conn.execute(_NOTIFY, chunk)  # delivered at commit, to every listening API
    return True
