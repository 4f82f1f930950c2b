"""Postgres side of outgoing webhooks: endpoints (admin API), deliveries and attempts (the agent).

Every change to an endpoint sends NOTIFY `parley_webhook_endpoints`, and every delivery made
pending again outside the agent (a manual retry, a replay) sends NOTIFY
`parley_webhook_deliveries` with its partition, so the worker that sends that partition picks it
up at once (agents/webhooks.py).
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from channels.signatures import standard_webhook_key
from domain.webhooks import ENDPOINT_DISABLED, subscribed
from streams.channel_secrets import Sealer, SecretsKeyError
from streams.outgoing import Outgoing as OutboxRow
from streams.outgoing import write_outbox
from streams.schema import CUSTOM_PLAN
from streams.topics import partitioner

log = logging.getLogger(__name__)

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
ENDPOINTS_CHANNEL = "parley_webhook_endpoints"
DELIVERIES_CHANNEL = "parley_webhook_deliveries"
RESPONSE_KEPT = 1000  # characters of an endpoint's answer kept per attempt


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def new_endpoint_id() -> str:
    """An endpoint id."""
    return "ep_" + os.urandom(12).hex()


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as the sender needs it: where, what, and the keys that sign now."""

    id: str
    url: str
    events: tuple[str, ...]
    enabled: bool
    keys: tuple[bytes, ...]  # current first; the rotated-out one while it still signs
    failing_since: datetime | None


def public(row: asyncpg.Record) -> dict[str, Any]:
    """An endpoint as the API shows it: never a secret."""
    return {
        "id": row["id"],
        "url": row["url"],
        "events": list(row["events"]),
        "description": row["description"],
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "failing_since": _iso(row["failing_since"]),
        "previous_secret_until": _iso(row["previous_until"]),
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def endpoint_of(row: asyncpg.Record, sealer: Callable[[], Sealer], now: datetime) -> Endpoint:
    """The sender's view of a row: its secrets opened into HMAC keys."""
    keys = [standard_webhook_key(sealer().open(row["secret"])["secret"])]
    if row["previous_secret"] and row["previous_until"] and row["previous_until"] > now:
        keys.append(standard_webhook_key(sealer().open(row["previous_secret"])["secret"]))
    return Endpoint(
        row["id"], row["url"], tuple(row["events"]), row["enabled"], tuple(keys), row["failing_since"]
    )


async def notify_endpoints(conn: Conn, endpoint_id: str) -> None:
    """Tell every worker an endpoint changed (delivered at commit)."""
    await conn.execute("SELECT pg_notify($1, $2)", ENDPOINTS_CHANNEL, endpoint_id)


async def notify_deliveries(conn: Conn, partitions: Iterable[int]) -> None:
    """Tell the workers that these partitions have deliveries pending again (at commit)."""
    for p in sorted(set(partitions)):
        await conn.execute("SELECT pg_notify($1, $2)", DELIVERIES_CHANNEL, str(p))


# -- endpoints (admin API) ---------------------------------------------------------------------

_ENDPOINT_COLUMNS = (
    "id, url, events, description, enabled, disabled_reason, secret, previous_secret, previous_until,"
    " failing_since, created_at, updated_at"
)


async def create_endpoint(
    conn: Conn,
    sealer: Sealer,
    *,
    url: str,
    events: Sequence[str],
    description: str,
    now: datetime,
) -> tuple[asyncpg.Record, str]:
    """A new endpoint and its secret (the only time the secret leaves Postgres in clear)."""
    secret = new_secret()
    async with conn.transaction():
        row = await conn.fetchrow(
            f"INSERT INTO webhook_endpoints (id, url, events, description, secret, created_at, updated_at)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {_ENDPOINT_COLUMNS}",
            new_endpoint_id(),
            url,
            list(events),
            description,
            sealer.seal({"secret": secret}),
            now,
        )
        assert row is not None
        await notify_endpoints(conn, row["id"])
    return row, secret


async def endpoint_row(conn: Conn, endpoint_id: str) -> asyncpg.Record | None:
    """One endpoint's row, or None."""
    return await conn.fetchrow(
        f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1", endpoint_id
    )


async def endpoint_rows(conn: Conn, *, limit: int, after: str | None) -> list[asyncpg.Record]:
    """Endpoints by id, `limit` after the cursor id."""
    return list(
        await conn.fetch(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE $1::text IS NULL OR id > $1"
            " ORDER BY id LIMIT $2",
            after,
            limit,
        )
    )


async def update_endpoint(
    conn: Conn, endpoint_id: str, changes: dict[str, Any], now: datetime
) -> asyncpg.Record | None:
    """Apply url / events / description / enabled changes; enabling clears the failure record."""
    sets, args = ["updated_at = $2"], [endpoint_id, now]
    for column in ("url", "events", "description", "enabled"):
        if column in changes:
            args.append(changes[column])
            sets.append(f"{column} = ${len(args)}")
    if changes.get("enabled") is True:
        sets += ["disabled_reason = NULL", "failing_since = NULL"]
    async with conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE webhook_endpoints SET {', '.join(sets)} WHERE id = $1 RETURNING {_ENDPOINT_COLUMNS}",
            *args,
        )
        if row is not None:
            await notify_endpoints(conn, endpoint_id)
            if changes.get("enabled") is True:  # its waiting deliveries go again
                parts = await conn.fetch(
                    "SELECT DISTINCT partition FROM webhook_deliveries"
                    " WHERE endpoint_id = $1 AND status = 'pending'",
                    endpoint_id,
                )
                await notify_deliveries(conn, [r["partition"] for r in parts])
    return row


async def delete_endpoint(conn: Conn, endpoint_id: str) -> bool:
    """Remove an endpoint with its deliveries and attempts."""
    async with conn.transaction():
        done = await conn.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
        await notify_endpoints(conn, endpoint_id)
    return bool(done.endswith(" 1"))


async def rotate_secret(
    conn: Conn, sealer: Sealer, endpoint_id: str, *, overlap: timedelta, now: datetime
) -> tuple[str, datetime] | None:
    """A new secret; the current one keeps signing (a second signature) for `overlap`."""
    secret = new_secret()
    until = now + overlap
    async with conn.transaction():
        done = await conn.execute(
            "UPDATE webhook_endpoints SET previous_secret = secret, previous_until = $3, secret = $2,"
            " updated_at = $4 WHERE id = $1",
            endpoint_id,
            sealer.seal({"secret": secret}),
            until,
            now,
        )
        if not done.endswith(" 1"):
            return None
        await notify_endpoints(conn, endpoint_id)
    return secret, until


async def reseal_endpoints(conn: Conn, sealer: Sealer) -> int:
    """Re-encrypt every endpoint secret under the first key of PARLEY_SECRETS_KEY."""
    n = 0
    async with conn.transaction():
        for row in await conn.fetch("SELECT id, secret, previous_secret FROM webhook_endpoints FOR UPDATE"):
            previous = sealer.reseal(row["previous_secret"]) if row["previous_secret"] else None
            await conn.execute(
                "UPDATE webhook_endpoints SET secret = $2, previous_secret = $3 WHERE id = $1",
                row["id"],
                sealer.reseal(row["secret"]),
                previous,
            )
            n += 1
    return n


async def endpoints_version(conn: Conn) -> int:
    """A counter every change to an endpoint's existence, events or enabled flag bumps, in the
    changing transaction (migration 0013): a fan-out that reads it before a batch and reloads when
    it moved never misses an endpoint whose change committed before the event was published."""
    version: int = await conn.fetchval("SELECT version FROM webhook_endpoints_version")
    return version


async def all_endpoints(conn: Conn, sealer: Callable[[], Sealer], now: datetime) -> dict[str, Endpoint]:
    """Every endpoint, as the sender needs it."""
    rows = await conn.fetch(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints")
    found: dict[str, Endpoint] = {}
    for row in rows:
        try:
            found[row["id"]] = endpoint_of(row, sealer, now)
        except SecretsKeyError as exc:  # a wrong PARLEY_SECRETS_KEY here: it cannot sign, so it waits
            log.error("webhooks: endpoint %s cannot be used: %s", row["id"], exc)
            found[row["id"]] = Endpoint(row["id"], row["url"], tuple(row["events"]), False, (), None)
    return found


# -- deliveries (agent) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    """One record of <prefix>.outgoing-events, as the fan-out reads it."""

    event_id: str
    type: str
    key: str
    body: bytes
    partition: int
    offset: int


@dataclass(frozen=True)
class Delivery:
    """A pending delivery as the dispatcher holds it."""

    id: int
    endpoint_id: str
    event_id: str
    lane: str
    partition: int
    seq: int
    body: bytes
    attempts: int  # made so far
    retry_base: int  # attempts before the last manual retry: the schedule counts from there
    next_attempt_at: datetime | None


_EVENTS_IN = """
INSERT INTO webhook_events (event_id, type, key, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
ON CONFLICT (event_id) DO NOTHING
"""
# The events and their deliveries in one statement (one round trip, atomic by itself): the
# foreign key from a delivery to its event is checked at the end of the statement, when the
# events' rows are in.
_FAN_OUT = """
WITH events AS (
    INSERT INTO webhook_events (event_id, type, key, body)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
    ON CONFLICT (event_id) DO NOTHING
)
INSERT INTO webhook_deliveries
    (endpoint_id, event_id, event_type, lane, partition, seq, status, next_attempt_at, created_at, updated_at)
SELECT e, i, t, l, p, s, 'pending', $11, $11, $11
FROM unnest($5::text[], $6::text[], $7::text[], $8::text[], $9::int[], $10::bigint[]) AS f(e, i, t, l, p, s)
ON CONFLICT (endpoint_id, event_id) DO NOTHING
RETURNING id, endpoint_id, event_id
"""


async def fan_out(
    conn: Conn, records: Sequence[Outgoing], endpoints: Iterable[Endpoint], now: datetime
) -> list[Delivery]:
    """Store a delivery per (subscribed enabled endpoint, record); returns the new ones (a
    redelivered record finds its deliveries there already and returns nothing)."""
    live = [ep for ep in endpoints if ep.enabled]
    pairs = [(ep, r) for r in records for ep in live if subscribed(ep.events, r.type)]
    if not pairs:
        return []
    wanted = {r.event_id: r for _, r in pairs}
    rows = await conn.fetch(
        _FAN_OUT,
        list(wanted),
        [r.type for r in wanted.values()],
        [r.key for r in wanted.values()],
        [r.body for r in wanted.values()],
        [ep.id for ep, _ in pairs],
        [r.event_id for _, r in pairs],
        [r.type for _, r in pairs],
        [r.key for _, r in pairs],
        [r.partition for _, r in pairs],
        [r.offset for _, r in pairs],
        now,
    )
    created = {(row["endpoint_id"], row["event_id"]): row["id"] for row in rows}
    return [
        Delivery(
            created[(ep.id, r.event_id)], ep.id, r.event_id, r.key, r.partition, r.offset, r.body, 0, 0, now
        )
        for ep, r in pairs
        if (ep.id, r.event_id) in created
    ]


_PENDING = """
SELECT d.id, d.endpoint_id, d.event_id, d.lane, d.partition, d.seq, e.body, d.attempts, d.retry_base,
       d.next_attempt_at
FROM webhook_deliveries d JOIN webhook_events e USING (event_id)
WHERE d.status = 'pending' AND d.partition = ANY($1::int[])
ORDER BY d.partition, d.seq
"""


async def pending(conn: Conn, partitions: Iterable[int]) -> list[Delivery]:
    """Every pending delivery of these partitions, in log order."""
    rows = await conn.fetch(_PENDING, sorted(set(partitions)))
    return [Delivery(**dict(row)) for row in rows]


@dataclass(frozen=True)
class Result:
    """One attempt's outcome, as stored."""

    delivery_id: int
    attempt: int
    at: datetime
    status: int | None
    latency_ms: float
    error: str | None
    response: str
    new_status: str  # pending (retry) | succeeded | failed
    next_attempt_at: datetime | None


# One statement (one round trip, atomic by itself): the attempts, then their deliveries' new
# state. An endpoint deleted meanwhile took its deliveries along: their attempts are not stored.
_RESULTS = """
WITH f AS MATERIALIZED (
    SELECT * FROM unnest(
        $1::bigint[], $2::int[], $3::timestamptz[], $4::int[], $5::real[], $6::text[], $7::text[],
        $8::text[], $9::timestamptz[]
    ) AS f(id, n, at, s, l, e, r, st, nx)
), attempts AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, at, status, latency_ms, error, response)
    SELECT f.id, f.n, f.at, f.s, f.l, f.e, f.r FROM f JOIN webhook_deliveries d ON d.id = f.id
    ON CONFLICT (delivery_id, attempt) DO NOTHING
)
UPDATE webhook_deliveries d SET status = f.st, attempts = f.n, next_attempt_at = f.nx, last_status = f.s,
    last_error = f.e, updated_at = f.at
FROM f
WHERE d.id = f.id
"""


async def record_results(conn: Conn, results: Sequence[Result]) -> None:
    """Store a group of attempts and their deliveries' new state in one statement (planned for
    this execution: streams/schema.CUSTOM_PLAN)."""
    async with conn.transaction():
        await conn.execute(CUSTOM_PLAN)
        await conn.execute(
            _RESULTS,
            [r.delivery_id for r in results],
            [r.attempt for r in results],
            [r.at for r in results],
            [r.status for r in results],
            [r.latency_ms for r in results],
            [r.error for r in results],
            [r.response[:RESPONSE_KEPT] for r in results],
            [r.new_status for r in results],
            [r.next_attempt_at for r in results],
        )


async def endpoint_failing(conn: Conn, endpoint_id: str, since: datetime | None) -> None:
    """Record when an endpoint started failing (None: it just succeeded)."""
    await conn.execute(
        "UPDATE webhook_endpoints SET failing_since = $2 WHERE id = $1 AND failing_since IS DISTINCT FROM $2",
        endpoint_id,
        since,
    )


async def disable_endpoint(conn: Conn, endpoint_id: str, reason: str, now: datetime, partitions: int) -> bool:
    """Disable an endpoint and emit `webhook_endpoint.disabled` (once: False if it was already)."""
    async with conn.transaction():
        done = await conn.execute(
            "UPDATE webhook_endpoints SET enabled = false, disabled_reason = $2, updated_at = $3"
            " WHERE id = $1 AND enabled",
            endpoint_id,
            reason,
            now,
        )
        if not done.endswith(" 1"):
            return False
        key = f"webhook-endpoint:{endpoint_id}"
        data = orjson.dumps({"endpoint_id": endpoint_id, "reason": reason}).decode()
        event_id = f"{endpoint_id}:disabled:{int(now.timestamp() * 1000)}"
        row = OutboxRow(event_id, ENDPOINT_DISABLED, key, data, now)
        await write_outbox(conn, [row], partitioner(partitions))
        await notify_endpoints(conn, endpoint_id)
    return True


# -- delivery log (admin API) ------------------------------------------------------------------

_DELIVERY_COLUMNS = (
    "d.id, d.endpoint_id, d.event_id, d.event_type, d.lane AS key, d.status, d.attempts, d.next_attempt_at,"
    " d.last_status, d.last_error, d.created_at, d.updated_at"
)


def delivery_json(row: asyncpg.Record) -> dict[str, Any]:
    """A delivery as the API shows it."""
    out = dict(row)
    for k in ("next_attempt_at", "created_at", "updated_at"):
        out[k] = _iso(out[k])
    return out


async def deliveries(
    conn: Conn,
    endpoint_id: str,
    *,
    status: str | None,
    event_type: str | None,
    limit: int,
    before: int | None,
) -> list[asyncpg.Record]:
    """An endpoint's deliveries, newest first, `limit` before the cursor id."""
    return list(
        await conn.fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.endpoint_id = $1"
            " AND ($2::text IS NULL OR d.status = $2) AND ($3::text IS NULL OR d.event_type = $3)"
            " AND ($4::bigint IS NULL OR d.id < $4) ORDER BY d.id DESC LIMIT $5",
            endpoint_id,
            status,
            event_type,
            before,
            limit,
        )
    )


async def delivery(conn: Conn, delivery_id: int) -> dict[str, Any] | None:
    """One delivery with its attempts."""
    row = await conn.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.id = $1", delivery_id
    )
    if row is None:
        return None
    attempts = await conn.fetch(
        "SELECT attempt, at, status, latency_ms, error, response FROM webhook_attempts"
        " WHERE delivery_id = $1 ORDER BY attempt",
        delivery_id,
    )
    out = delivery_json(row)
    out["attempt_log"] = [{**dict(a), "at": a["at"].isoformat()} for a in attempts]
    return out


async def retry_delivery(conn: Conn, delivery_id: int, now: datetime) -> asyncpg.Record | None:
    """Make a delivery pending again now, with a fresh retry schedule."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE webhook_deliveries SET status = 'pending', retry_base = attempts, next_attempt_at = $2,"
            " updated_at = $2 WHERE id = $1 RETURNING partition",
            delivery_id,
            now,
        )
        if row is None:
            return None
        await notify_deliveries(conn, [row["partition"]])
        found = await conn.fetchrow(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d WHERE d.id = $1", delivery_id
        )
    return found


_REPLAY_DELIVERIES = """
INSERT INTO webhook_deliveries
    (endpoint_id, event_id, event_type, lane, partition, seq, status, next_attempt_at, created_at, updated_at)
SELECT $1, i, t, l, p, s, 'pending', $7, $7, $7
FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[]) AS f(i, t, l, p, s)
ON CONFLICT (endpoint_id, event_id) DO UPDATE SET status = 'pending',
    retry_base = webhook_deliveries.attempts, next_attempt_at = $7, updated_at = $7
"""


async def replay(conn: Conn, endpoint_id: str, records: Sequence[Outgoing], now: datetime) -> int:
    """Make every record a pending delivery for this endpoint again (same event ids)."""
    first: dict[str, Outgoing] = {}
    for r in records:
        first.setdefault(r.event_id, r)  # a record published twice (at least once) counts once
    records = list(first.values())
    if not records:
        return 0
    async with conn.transaction():
        await conn.execute(
            _EVENTS_IN,
            [r.event_id for r in records],
            [r.type for r in records],
            [r.key for r in records],
            [r.body for r in records],
        )
        await conn.execute(
            _REPLAY_DELIVERIES,
            endpoint_id,
            [r.event_id for r in records],
            [r.type for r in records],
            [r.key for r in records],
            [r.partition for r in records],
            [r.offset for r in records],
            now,
        )
        await notify_deliveries(conn, [r.partition for r in records])
    return len(records)
