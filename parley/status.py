"""`parley status`: a running deployment on one screen; exit code 0 only when it is ready.

What it asks, each with a short timeout, and what it shows when a part does not answer:
- readiness: the API's /readyz (api/health.py); if the API does not answer, the same checks run
  here (api.health.Readiness) so the screen still says which of Postgres, Kafka, worker is down;
- the worker's own /metrics (agents/metrics.py): writer up, partitions, events applied, timers;
- consumer lag per topic: the worker group's committed offsets against the topics' end offsets;
- counts from Postgres: conversations by state, dead letters, schedules, webhook deliveries and
  outbound sends by status, armed timers.

With no DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS it looks where `parley run` starts them
(PARLEY_DATA_DIR, PARLEY_POSTGRES_PORT, PARLEY_KAFKA_PORT), so it works next to `make run`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.settings import Settings
from streams.topics import Topics

T = TypeVar("T")
TIMEOUT = 5.0


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text (flat names, as agents/metrics.render writes them) -> name -> value."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name.strip()] = float(value)
        except ValueError:
            continue
    return values


@dataclass(frozen=True)
class TopicLag:
    """One topic's lag for a consumer group: records not yet committed, over all its partitions."""

    lag: int
    partitions: int
    uncommitted: int  # partitions the group never committed (their lag counts from the log start)
    end: int = 0  # sum of the partitions' end offsets: records ever written (its change over time is a rate)


def lag_by_topic(
    ends: Mapping[TopicPartition, int],
    starts: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int],
) -> dict[str, TopicLag]:
    """Per topic: sum over partitions of end - committed (end - log start where nothing is committed)."""
    acc: dict[str, list[int]] = {}
    for tp, end in ends.items():
        lag, parts, uncommitted, total = acc.setdefault(tp.topic, [0, 0, 0, 0])
        offset = committed.get(tp, -1)
        if offset < 0:
            uncommitted += 1
            offset = starts.get(tp, 0)
        acc[tp.topic] = [lag + max(0, end - offset), parts + 1, uncommitted, total + end]
    return {topic: TopicLag(*v) for topic, v in sorted(acc.items())}


@dataclass
class Status:
    """Everything `parley status` found; `errors` names what could not be asked."""

    ready: bool = False
    readiness_source: str = ""
    checks: dict[str, str] = field(default_factory=dict)
    worker: dict[str, float] | None = None
    lag: dict[str, TopicLag] | None = None
    counts: dict[str, dict[str, int]] | None = None
    newest_dead_letter: datetime | None = None
    errors: dict[str, str] = field(default_factory=dict)


def resolve(settings: Settings) -> Settings:
    """Settings with DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS filled in from `parley run`'s local
    stack when they are not set."""
    from parley.localstack import LocalPostgres

    updates: dict[str, Any] = {}
    if not settings.database_url:
        pg = LocalPostgres(settings.data_dir.resolve() / "postgres", settings.postgres_port)
        if pg.password_file.exists():
            updates["database_url"] = pg.url
    if not settings.kafka_bootstrap_servers:
        updates["kafka_bootstrap_servers"] = f"127.0.0.1:{settings.kafka_port}"
    return settings.model_copy(update=updates)


async def _bounded(what: Awaitable[T]) -> T:
    return await asyncio.wait_for(what, TIMEOUT)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _readiness(settings: Settings, http: aiohttp.ClientSession, status: Status) -> None:
    url = f"http://{settings.http_host}:{settings.http_port}/readyz"
    try:
        async with http.get(url) as r:
            body = await r.json()
        status.checks = {"api": "ok", **body.get("checks", {})}
        status.ready = r.status == 200 and bool(body.get("ready"))
        status.readiness_source = url
        return
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        status.errors["api"] = f"{url}: {_why(exc)}"
    # No API: run its checks from here, so the screen still says what else is up.
    from api.health import Readiness

    status.checks = {"api": "unreachable"}
    status.readiness_source = "checked from here (the API did not answer)"
    try:
        pool = await _bounded(asyncpg.create_pool(settings.database_url, min_size=1, max_size=1))
    except Exception as exc:  # noqa: BLE001 - any failure: Postgres is not usable from here
        status.checks.update({"postgres": "failing"})
        status.errors.setdefault("postgres", _why(exc))
        return
    readiness = Readiness(pool, settings.kafka_bootstrap_servers, settings.app_id)
    try:
        status.checks.update(await readiness.check())
    finally:
        await readiness.close()
        await pool.close()


async def _worker(settings: Settings, http: aiohttp.ClientSession, status: Status) -> None:
    url = f"http://{settings.http_host}:{settings.worker_metrics_port}/metrics"
    try:
        async with http.get(url) as r:
            r.raise_for_status()
            status.worker = parse_metrics(await r.text())
    except (aiohttp.ClientError, TimeoutError) as exc:
        status.errors["worker metrics"] = f"{url}: {_why(exc)}"


async def consumer_lag(bootstrap: str, group: str, topics: list[str]) -> dict[str, TopicLag]:
    """The group's lag per topic (committed offsets from the group coordinator, ends from the log)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(TIMEOUT * 1000))
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=int(TIMEOUT * 1000))
    try:
        await _bounded(admin.start())
        await _bounded(consumer.start())
        offsets = await _bounded(admin.list_consumer_group_offsets(group))
        committed = {tp: meta.offset for tp, meta in offsets.items()}
        described = await _bounded(admin.describe_topics(topics))
        tps = [
            TopicPartition(t["topic"], p["partition"])
            for t in described
            if not t["error_code"]
            for p in sorted(t["partitions"], key=lambda p: p["partition"])
        ]
        ends = await _bounded(consumer.end_offsets(tps))
        starts = await _bounded(consumer.beginning_offsets(tps))
        return lag_by_topic(ends, starts, committed)
    finally:
        await consumer.stop()
        await admin.close()


_COUNTS = """
SELECT 'conversations' AS what, state AS status, count(*)::bigint AS n FROM conversations GROUP BY state
UNION ALL SELECT 'schedules', status, count(*) FROM schedules GROUP BY status
UNION ALL SELECT 'webhook deliveries', status, count(*) FROM webhook_deliveries GROUP BY status
UNION ALL SELECT 'outbound sends', status, count(*) FROM outbound_sends GROUP BY status
UNION ALL SELECT 'dead letters', CASE WHEN retried_at IS NULL THEN 'not retried' ELSE 'retried' END, count(*)
    FROM dead_letters GROUP BY 2
UNION ALL SELECT 'timers',
    CASE WHEN due_at <= now() + interval '1 hour' THEN 'due within 1 h' ELSE 'later' END, count(*)
    FROM scheduled_actions GROUP BY 2
UNION ALL SELECT 'paused', part, 1 FROM paused_parts
"""


async def counts(database_url: str) -> tuple[dict[str, dict[str, int]], datetime | None]:
    """Rows by status in the tables an operator watches, and the newest dead letter's time."""
    conn = await _bounded(asyncpg.connect(database_url))
    try:
        found: dict[str, dict[str, int]] = {}
        for row in await _bounded(conn.fetch(_COUNTS)):
            found.setdefault(row["what"], {})[row["status"]] = row["n"]
        newest = await _bounded(conn.fetchval("SELECT max(failed_at) FROM dead_letters"))
        return found, newest
    finally:
        await conn.close()


async def gather(settings: Settings) -> Status:
    """Ask every part, concurrently; what does not answer lands in `errors`."""
    status = Status()
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)

    async def lag() -> None:
        try:
            topics = Topics(settings.topic_prefix).all()
            status.lag = await consumer_lag(settings.kafka_bootstrap_servers, settings.app_id, topics)
        except Exception as exc:  # noqa: BLE001 - any failure: shown, and the deployment is not ready
            status.errors["kafka"] = _why(exc)

    async def rows() -> None:
        if not settings.database_url:
            status.errors["postgres"] = "DATABASE_URL is not set and no `parley run` data was found"
            return
        try:
            status.counts, status.newest_dead_letter = await counts(settings.database_url)
        except Exception as exc:  # noqa: BLE001 - any failure: shown, and the deployment is not ready
            status.errors["postgres"] = _why(exc)

    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(
            _readiness(settings, http, status), _worker(settings, http, status), lag(), rows()
        )
    return status


def _n(value: float) -> str:
    return f"{int(value):,}"


def render(status: Status, settings: Settings, now: datetime | None = None) -> str:
    """The one screen."""
    now = now or datetime.now(UTC)
    lines = [f"Parley status at {now:%Y-%m-%d %H:%M:%S} UTC (group {settings.app_id!r})"]
    checks = ", ".join(f"{k} {v}" for k, v in status.checks.items())
    lines.append(f"ready:          {'yes' if status.ready else 'NO'}  ({checks}; {status.readiness_source})")
    w = status.worker
    if w is not None:
        lines.append(
            f"worker:         writer {'up' if w.get('parley_lifecycle_writer_up') else 'DOWN'},"
            f" {_n(w.get('parley_partitions_assigned', 0))} partitions,"
            f" {_n(w.get('parley_lifecycle_events_applied_total', 0))} events applied,"
            f" {_n(w.get('parley_timers_active', 0))} timers in memory"
            f" (this worker, since it started)"
        )
    if status.lag is not None:
        lines.append("consumer lag:   records not yet processed by the worker group")
        for topic, t in status.lag.items():
            never = f", {t.uncommitted} never committed" if t.uncommitted else ""
            lines.append(f"  {topic:<34} {_n(t.lag):>10}  ({t.partitions} partitions{never})")
    if status.counts is not None:
        c = status.counts

        def row(what: str, order: tuple[str, ...] = ()) -> str:
            found = c.get(what, {})
            keys = [k for k in order if k in found] + sorted(k for k in found if k not in order)
            return ", ".join(f"{_n(found[k])} {k}" for k in keys) or "none"

        paused = ", ".join(sorted(c.get("paused", {}))) or "nothing (POST /v1/admin/pause stops a part)"
        lines.append(f"paused:         {paused}")
        states = ("idle", "processing", "awaiting_confirmation", "waiting_close", "closed")
        lines.append(f"conversations:  {row('conversations', states)}")
        newest = status.newest_dead_letter
        since = f" (newest {newest.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)" if newest else ""
        lines.append(f"dead letters:   {row('dead letters', ('not retried', 'retried'))}{since}")
        lines.append(f"timers:         {row('timers', ('due within 1 h', 'later'))}")
        lines.append(f"schedules:      {row('schedules', ('scheduled', 'fired', 'succeeded', 'failed'))}")
        lines.append(f"webhooks:       {row('webhook deliveries', ('pending', 'succeeded', 'failed'))}")
        lines.append(f"sends:          {row('outbound sends', ('queued', 'sending', 'sent', 'failed'))}")
    for what, why in status.errors.items():
        lines.append(f"unavailable:    {what}: {why}")
    return "\n".join(lines)


def as_json(status: Status) -> str:
    """The same, for scripts."""
    doc = {
        "ready": status.ready,
        "checks": status.checks,
        "worker": status.worker,
        "lag": {t: vars(v) for t, v in status.lag.items()} if status.lag is not None else None,
        "counts": status.counts,
        "newest_dead_letter": status.newest_dead_letter.isoformat() if status.newest_dead_letter else None,
        "errors": status.errors,
    }
    return json.dumps(doc, indent=2)


def cmd_status(settings: Settings, as_json_output: bool = False) -> int:
    """Print the deployment's state; 0 if ready, 1 if not."""
    settings = resolve(settings)
    logging.getLogger("api.health").setLevel(logging.ERROR)  # its findings are on the screen
    status = asyncio.run(gather(settings))
    print(as_json(status) if as_json_output else render(status, settings), flush=True)
    return 0 if status.ready else 1
