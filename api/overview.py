"""GET /v1/overview: the console's aggregates, each from a bounded or indexed query, and what is
paused (the emergency switch's table, at most three rows).

Every count stops at CAP (`LIMIT CAP + 1` under the count: a number above CAP means "more than
CAP"), and every time series reads an index range of the last hour, so one request costs at most
a few CAP-sized index scans whatever the size of the tables (README, "Console"). Consumer lag per
topic is parley.status.consumer_lag (the same numbers `parley status` prints), asked at most once
per LAG_TTL seconds per API process and shared by concurrent requests; the samples it keeps make
the events/s and lag trends (this process's memory: they start again when the API restarts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from api.context import CONTEXT, error
from parley.status import TopicLag, consumer_lag

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

CAP = 100_000  # counts stop here
ENDPOINTS_SHOWN = 50  # webhook endpoints listed (oldest first)
LAG_TTL = 5.0  # seconds between two consumer-lag look-ups
HISTORY = 120  # lag samples kept (10 min at one per LAG_TTL)
OPEN_STATES = ("idle", "processing", "awaiting_confirmation", "waiting_close")
SCHEDULE_STATUSES = ("scheduled", "fired", "succeeded", "failed", "cancelled")


def _capped(sql: str) -> str:
    """count(*) over at most CAP + 1 rows of `sql` (which selects 1 per row)."""
    return f"(SELECT count(*) FROM ({sql} LIMIT {CAP + 1}) capped)"


_COUNTS = f"""
SELECT
  {_capped("SELECT 1 FROM conversations WHERE state = 'closed' AND closed_at > now() - interval '24 hours'")}
      AS closed_24h,
  {_capped("SELECT 1 FROM scheduled_actions WHERE due_at <= now()")} AS timers_overdue,
  {_capped("SELECT 1 FROM scheduled_actions WHERE due_at > now() AND due_at <= now() + interval '1 minute'")}
      AS timers_next_minute,
  {_capped("SELECT 1 FROM scheduled_actions WHERE due_at > now() AND due_at <= now() + interval '1 hour'")}
      AS timers_next_hour,
  {_capped("SELECT 1 FROM dead_letters WHERE retried_at IS NULL")} AS dead_letters_not_retried,
  {_capped("SELECT 1 FROM outbound_sends WHERE status = 'queued'")} AS sends_queued,
  {_capped("SELECT 1 FROM outbound_sends WHERE status = 'sending'")} AS sends_sending,
  {_capped("SELECT 1 FROM outbound_sends WHERE status = 'failed'")} AS sends_failed,
  {_capped("SELECT 1 FROM webhook_deliveries WHERE status = 'pending'")} AS deliveries_pending
"""

# Open conversations only (the partial index conversations_open_thread): bounded by what is open.
_OPEN_BY_STATE = "SELECT state, count(*) AS n FROM conversations WHERE state <> 'closed' GROUP BY state"

_SCHEDULES = " UNION ALL ".join(
    "SELECT '{s}' AS status, {n} AS n".format(s=s, n=_capped(f"SELECT 1 FROM schedules WHERE status = '{s}'"))
    for s in SCHEDULE_STATUSES
)

# Minutes ago (0 = the current minute) for the last hour, from an index range each.
_PER_MINUTE = f"""
SELECT 'opened' AS what, floor(extract(epoch FROM now() - opened_at) / 60)::int AS ago, count(*) AS n
FROM (SELECT opened_at FROM conversations WHERE opened_at > now() - interval '60 minutes'
      ORDER BY opened_at DESC LIMIT {CAP}) o GROUP BY 2
UNION ALL
SELECT 'closed', floor(extract(epoch FROM now() - closed_at) / 60)::int, count(*)
FROM (SELECT closed_at FROM conversations WHERE state = 'closed' AND closed_at > now() - interval '60 minutes'
      ORDER BY closed_at DESC LIMIT {CAP}) c GROUP BY 2
"""

_REASONS = f"""
SELECT coalesce(close_reason, 'unknown') AS reason, count(*) AS n
FROM (SELECT close_reason FROM conversations
      WHERE state = 'closed' AND closed_at > now() - interval '24 hours'
      ORDER BY closed_at DESC LIMIT {CAP}) c
GROUP BY 1 ORDER BY 2 DESC
"""

_NEWEST_LETTER = (
    "SELECT id, failed_at, source_topic, left(error, 500) AS error, retried_at"
    " FROM dead_letters ORDER BY id DESC LIMIT 1"
)

_ENDPOINTS = f"""
SELECT e.id, e.url, e.enabled, e.disabled_reason, e.failing_since,
  {_capped("SELECT 1 FROM webhook_deliveries d WHERE d.endpoint_id = e.id AND d.status = 'failed'")} AS failed
FROM (SELECT * FROM webhook_endpoints ORDER BY created_at, id LIMIT {ENDPOINTS_SHOWN}) e
ORDER BY e.created_at, e.id
"""


@dataclass
class LagSampler:
    """Consumer lag per topic, asked at most once per LAG_TTL, with the samples of the last minutes."""

    bootstrap: str
    group: str
    topics: list[str]
    samples: deque[tuple[float, dict[str, TopicLag]]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    error: str | None = None
    _asked_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def current(self) -> None:
        """Ask Kafka unless a sample (or a failure) is younger than LAG_TTL."""
        async with self._lock:
            if time.monotonic() - self._asked_at < LAG_TTL:
                return
            self._asked_at = time.monotonic()
            try:
                lag = await consumer_lag(self.bootstrap, self.group, self.topics)
            except Exception as exc:  # noqa: BLE001 - any failure is shown; the rest still answers
                self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("overview: consumer lag unavailable: %s", self.error)
                return
            self.error = None
            self.samples.append((time.time(), lag))

    def view(self, events_topic: str) -> dict[str, Any]:
        """The latest lag per topic, and events/s in and applied on the events topic between samples."""
        latest = self.samples[-1][1] if self.samples else None
        series = []
        pairs = list(zip(list(self.samples)[:-1], list(self.samples)[1:], strict=True))
        for (t0, a), (t1, b) in pairs:
            if events_topic not in a or events_topic not in b or t1 <= t0:
                continue
            before, after = a[events_topic], b[events_topic]
            written = max(0, after.end - before.end)
            applied = max(0, (after.end - after.lag) - (before.end - before.lag))
            series.append(
                {
                    "at": datetime.fromtimestamp(t1, UTC).isoformat(),
                    "in_per_s": round(written / (t1 - t0), 3),
                    "applied_per_s": round(applied / (t1 - t0), 3),
                    "lag": after.lag,
                }
            )
        return {
            "lag": (
                {
                    t: {"lag": v.lag, "partitions": v.partitions, "uncommitted": v.uncommitted}
                    for t, v in latest.items()
                }
                if latest is not None
                else None
            ),
            "lag_error": self.error,
            "events": {
                "topic": events_topic,
                "in_per_s": series[-1]["in_per_s"] if series else None,
                "applied_per_s": series[-1]["applied_per_s"] if series else None,
                "series": series,
            },
        }


SAMPLER: web.AppKey[LagSampler] = web.AppKey("parley_lag_sampler", LagSampler)


async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's lag sampler (after `resources`: it reads CONTEXT)."""
    ctx = app[CONTEXT]
    app[SAMPLER] = LagSampler(ctx.settings.kafka_bootstrap_servers, ctx.settings.app_id, ctx.topics.all())
    yield


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


async def _database(pool: asyncpg.Pool) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        now = await conn.fetchval("SELECT now()")
        counts = await conn.fetchrow(_COUNTS)
        open_rows = await conn.fetch(_OPEN_BY_STATE)
        schedules = await conn.fetch(_SCHEDULES)
        minutes = await conn.fetch(_PER_MINUTE)
        reasons = await conn.fetch(_REASONS)
        newest = await conn.fetchrow(_NEWEST_LETTER)
        endpoints = await conn.fetch(_ENDPOINTS)
        paused = await conn.fetch("SELECT part, paused_at, reason FROM paused_parts ORDER BY part")
    assert counts is not None
    by_state = {s: 0 for s in OPEN_STATES}
    by_state.update({r["state"]: r["n"] for r in open_rows})
    per_minute: dict[str, list[int]] = {"opened": [0] * 60, "closed": [0] * 60}
    for r in minutes:
        if 0 <= r["ago"] < 60:
            per_minute[r["what"]][59 - r["ago"]] += r["n"]  # oldest first, the current minute last
    return {
        "generated_at": now.isoformat(),
        "cap": CAP,
        "conversations": {
            "open_by_state": by_state,
            "open": sum(by_state.values()),
            "closed_last_24h": counts["closed_24h"],
            "close_reasons_last_24h": {r["reason"]: r["n"] for r in reasons},
            "per_minute": per_minute,
        },
        "timers": {
            "overdue": counts["timers_overdue"],
            "next_minute": counts["timers_next_minute"],
            "next_hour": counts["timers_next_hour"],
        },
        "dead_letters": {
            "not_retried": counts["dead_letters_not_retried"],
            "newest": (
                {
                    "id": newest["id"],
                    "failed_at": _iso(newest["failed_at"]),
                    "source_topic": newest["source_topic"],
                    "error": newest["error"],
                    "retried_at": _iso(newest["retried_at"]),
                }
                if newest
                else None
            ),
        },
        "outbound": {
            "queued": counts["sends_queued"],
            "sending": counts["sends_sending"],
            "failed": counts["sends_failed"],
        },
        "webhooks": {
            "pending": counts["deliveries_pending"],
            "endpoints": [
                {
                    "id": e["id"],
                    "url": e["url"],
                    "enabled": e["enabled"],
                    "disabled_reason": e["disabled_reason"],
                    "failing_since": _iso(e["failing_since"]),
                    "failed": e["failed"],
                }
                for e in endpoints
            ],
        },
        "schedules": {r["status"]: r["n"] for r in schedules},
        "paused": {r["part"]: {"since": r["paused_at"].isoformat(), "reason": r["reason"]} for r in paused},
    }


@routes.get("/v1/overview")
async def overview(request: web.Request) -> web.Response:
    """The console's overview: counts, last hour per minute, lag and events/s, failures."""
    ctx = request.app[CONTEXT]
    sampler = request.app[SAMPLER]
    try:
        found, _ = await asyncio.gather(_database(ctx.store.pool), sampler.current())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("overview: Postgres unavailable: %s", exc)
        return error(503, "Postgres unavailable, retry later")
    return web.json_response({**found, **sampler.view(ctx.topics.conversation_events)})
