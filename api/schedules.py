"""Schedules API (/v1/schedules, bearer token): the seeds' job scheduler on the actions engine.

Every command becomes a record on the conversation-events topic keyed `schedule:<key>` and is
decided by the lifecycle agent, in one order with the schedule's firings (domain/schedules.py).
The API answers with the agent's decision: it produces the command (acks=all), then waits for the
command's row in `schedule_results`, woken by a NOTIFY the agent's transaction sends on commit
(a poll every POLL_INTERVAL covers a lost notification). No answer within ANSWER_TIMEOUT: 504
with the command's event id (it is in the log and will be applied; a repeated identical PUT, or
the same Idempotency-Key, is harmless). Kafka not acknowledging: 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.admin import IDEMPOTENCY_HEADER, _idempotency_key
from api.context import CONTEXT, error, json_body
from api.ingress import KafkaUnavailable
from channels import normalize
from domain.schedules import FINAL, KEY_PATTERN, Status, view
from streams.records import ScheduleCommand, SchedulePut, bundle_puts, keyed
from streams.schedules_db import RESULTS_CHANNEL, schedule_of
from streams.topics import partitioner

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

ANSWER_TIMEOUT = 10.0
POLL_INTERVAL = 0.5
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_AHEAD = timedelta(days=3653)  # ten years
MAX_BATCH = 1000


class ScheduleIn(BaseModel):
    """PUT /v1/schedules/{key} body: `run_at` (ISO-8601 with offset) or `delay` (seconds, or an
    ISO-8601 duration such as "PT1H"), never both."""

    model_config = ConfigDict(extra="forbid")

    run_at: AwareDatetime | None = None
    delay: timedelta | None = None
    event_type: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:/-]+$")
    payload: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int = Field(1, ge=1, le=100)
    backoff: float = Field(2.0, gt=0, le=86400)  # seconds before the 2nd attempt; doubles after

    @field_validator("run_at")
    @classmethod
    def _not_too_far(cls, v: datetime | None) -> datetime | None:
        if v is not None and v > datetime.now(UTC) + MAX_AHEAD:
            raise ValueError("run_at is more than 10 years away")
        return v

    @field_validator("delay")
    @classmethod
    def _delay(cls, v: timedelta | None) -> timedelta | None:
        if v is not None and not timedelta(0) <= v <= MAX_AHEAD:
            raise ValueError("delay must be between 0 and 10 years")
        return v

    @field_validator("payload")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(orjson.dumps(v)) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload is over {MAX_PAYLOAD_BYTES} bytes")
        return v


class ResultIn(BaseModel):
    """POST /v1/schedules/{key}/result body."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    error: str | None = Field(None, max_length=2000)
    version: int | None = None


class Answers:
    """Futures of commands waiting for their schedule_results row, resolved by NOTIFY or poll."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.waiting: dict[str, asyncio.Future[tuple[int, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Listen and poll in the background."""
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        """Stop both tasks."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def expect(self, event_id: str) -> asyncio.Future[tuple[int, Any]]:
        """The future of this command's answer (register before producing)."""
        fut = self.waiting.get(event_id)
        if fut is None:
            fut = self.waiting[event_id] = asyncio.get_running_loop().create_future()
        return fut

    def forget(self, event_ids: Sequence[str]) -> None:
        """Stop waiting (the command was not produced, or the caller gave up)."""
        for event_id in event_ids:
            fut = self.waiting.pop(event_id, None)
            if fut is not None and not fut.done():
                fut.cancel()

    async def fetch(self, ids: Sequence[str]) -> None:
        """Resolve the futures of those ids whose rows exist."""
        for i in range(0, len(ids), 5000):
            rows = await self.pool.fetch(
                "SELECT event_id, status, body::text AS body FROM schedule_results"
                " WHERE event_id = ANY($1::text[])",
                list(ids[i : i + 5000]),
            )
            for r in rows:
                fut = self.waiting.pop(r["event_id"], None)
                if fut is not None and not fut.done():
                    fut.set_result((r["status"], orjson.loads(r["body"])))

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        hits = [i for i in str(payload).split(",") if i in self.waiting]
        if hits:
            task = asyncio.ensure_future(self.fetch(hits))
            task.add_done_callback(_log_failure)

    async def _listen(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                try:
                    lost = asyncio.Event()
                    conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                    await conn.add_listener(RESULTS_CHANNEL, self._notified)
                    while not lost.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(lost.wait(), 10)
                        if not lost.is_set():  # a dead peer without a FIN is found by asking
                            await asyncio.wait_for(conn.fetchval("SELECT 1"), 10)
                finally:
                    conn.terminate()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("schedules: cannot listen for answers (%s); polling only", exc)
            await asyncio.sleep(1)  # reconnect back-off

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)  # the fallback poll's period
            if self.waiting:
                try:
                    await self.fetch(list(self.waiting))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("schedules: polling answers failed (%s)", exc)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("schedules: fetching answers failed (%s); the poll retries", task.exception())


ANSWERS: web.AppKey[Answers] = web.AppKey("parley_schedule_answers", Answers)


async def answers_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the answers listener of this API process (after the main resources)."""
    ctx = app[CONTEXT]
    answers = Answers(ctx.store.pool, ctx.settings.database_url)
    await answers.start()
    app[ANSWERS] = answers
    yield
    await answers.stop()


def _details(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return [{**e, "loc": [*prefix, *e["loc"]]} for e in errors]


def _key(request: web.Request) -> str | web.Response:
    """The schedule key of the route, or the 422 answering a bad one."""
    key = request.match_info["key"]
    if KEY_PATTERN.fullmatch(key):
        return key
    return error(
        422,
        "key must be 1 to 200 characters of A-Z a-z 0-9 . _ : -",
        details=[{"loc": ["key"], "msg": "invalid key", "type": "value_error"}],
    )


def _event_id(route: str, key: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return f"sched:{uuid.uuid4()}"
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"sched:{route}:{key}:{digest}"


def _put_record(key: str, body: ScheduleIn, event_id: str, now: datetime) -> SchedulePut:
    if body.delay is not None:
        run_at, delay_ms = now + body.delay, int(body.delay.total_seconds() * 1000)
    else:
        assert body.run_at is not None
        run_at, delay_ms = body.run_at.astimezone(UTC), None
    return SchedulePut(
        event_id=event_id,
        key=key,
        run_at=run_at,
        delay_ms=delay_ms,
        event_type=body.event_type,
        payload=body.payload,
        max_attempts=body.max_attempts,
        backoff_ms=int(body.backoff * 1000),
        issued_at=now,
    )


def _parse_put(raw: Any) -> ScheduleIn:
    body = ScheduleIn.model_validate(raw)
    if (body.run_at is None) == (body.delay is None):
        raise ValueError("give exactly one of run_at and delay")
    return body


async def _submit(request: web.Request, records: Sequence[SchedulePut | ScheduleCommand]) -> list[Any]:
    """Produce the commands and wait for every answer: (status, body) per record, or a Response."""
    ctx = request.app[CONTEXT]
    answers = request.app[ANSWERS]
    ids = [r.event_id for r in records]
    futures = [answers.expect(i) for i in ids]
    try:
        if request.headers.get(IDEMPOTENCY_HEADER):
            await answers.fetch(ids)  # a repeat whose answer exists: no need to produce again
        todo = [r for r, f in zip(records, futures, strict=True) if not f.done()]
        puts = [r for r in todo if isinstance(r, SchedulePut)]
        if len(puts) > 1 and len(puts) == len(todo):  # the batch route: a record per partition
            # the topic's own partition count, as the producer will place each bundle's key
            count = len(await ctx.ingress.producer.partitions_for(ctx.topics.conversation_events))
            pairs = bundle_puts(puts, partitioner(count), normalize.MAX_RECORD_BYTES)
        else:
            pairs = [keyed(r) for r in todo]
        for key, value in pairs:
            normalize.check_record(key, value, "the command")
        if pairs:
            await ctx.ingress.send_many(ctx.topics.conversation_events, pairs)
    except normalize.IngressError as exc:
        answers.forget(ids)
        return [error(exc.status, str(exc))]
    except (KafkaUnavailable, KafkaError):  # KafkaError: the partition count's metadata
        answers.forget(ids)
        return [error(503, "event log unavailable, retry later")]
    # asyncio.wait leaves what is not done at the timeout as it is (no cancel, so no shield)
    await asyncio.wait(futures, timeout=ANSWER_TIMEOUT)
    out: list[Any] = []
    for event_id, fut in zip(ids, futures, strict=True):
        if fut.done() and not fut.cancelled():
            out.append(fut.result())
        else:
            out.append(
                (
                    504,
                    {
                        "error": "no answer yet; the command is in the log and will be applied",
                        "event_id": event_id,
                    },
                )
            )
    answers.forget([i for i, f in zip(ids, futures, strict=True) if not f.done()])
    return out


def _respond(answer: Any) -> web.Response:
    if isinstance(answer, web.Response):
        return answer
    status, body = answer
    return web.json_response(body, status=status)


@routes.put("/v1/schedules/{key}")
async def put_schedule(request: web.Request) -> web.Response:
    """Create (201) or reschedule (200) a schedule; the same body again: 200 "unchanged"."""
    key = _key(request)
    if isinstance(key, web.Response):
        return key
    idem = _idempotency_key(request)
    if isinstance(idem, web.Response):
        return idem
    raw = await json_body(request)
    if isinstance(raw, web.Response):
        return raw
    try:
        body = _parse_put(raw)
    except ValidationError as exc:
        return error(422, "body does not match ScheduleIn", details=_details(exc))
    except ValueError as exc:
        return error(422, str(exc), details=[{"loc": ["run_at"], "msg": str(exc), "type": "value_error"}])
    record = _put_record(key, body, _event_id("put", key, idem), datetime.now(UTC))
    [answer] = await _submit(request, [record])
    return _respond(answer)


async def _command(request: web.Request, kind: str, **fields: Any) -> web.Response:
    key = _key(request)
    if isinstance(key, web.Response):
        return key
    idem = _idempotency_key(request)
    if isinstance(idem, web.Response):
        return idem
    record = ScheduleCommand(
        kind=kind,
        event_id=_event_id(kind.removeprefix("schedule."), key, idem),
        key=key,
        issued_at=datetime.now(UTC),
        **fields,
    )
    [answer] = await _submit(request, [record])
    return _respond(answer)


@routes.delete("/v1/schedules/{key}")
async def cancel_schedule(request: web.Request) -> web.Response:
    """Cancel a pending schedule (200); 409 once it fired; 404 for an unknown key."""
    return await _command(request, "schedule.cancel")


@routes.post("/v1/schedules/{key}/retry")
async def retry_schedule(request: web.Request) -> web.Response:
    """Run a failed schedule again now (a new version); 409 unless it failed."""
    return await _command(request, "schedule.retry")


@routes.post("/v1/schedules/{key}/result")
async def report_result(request: web.Request) -> web.Response:
    """The consumer of a fired event reports `{"ok": true}` or `{"ok": false, "error": "..."}`."""
    raw = await json_body(request)
    if isinstance(raw, web.Response):
        return raw
    try:
        body = ResultIn.model_validate(raw)
    except ValidationError as exc:
        return error(422, "body does not match ResultIn", details=_details(exc))
    return await _command(request, "schedule.result", ok=body.ok, error=body.error, version=body.version)


@routes.post("/v1/schedules:batch")
async def batch_put(request: web.Request) -> web.Response:
    """Up to 1,000 PUTs in one request: `{"items": [{"key": ..., <PUT body>}, ...]}`; every valid
    item is produced, then every answer awaited; answers in the items' order."""
    idem = _idempotency_key(request)
    if isinstance(idem, web.Response):
        return idem
    raw = await json_body(request)
    if isinstance(raw, web.Response):
        return raw
    items = raw.get("items") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH or set(raw) != {"items"}:
        return error(422, f'body must be {{"items": [...]}} with 1 to {MAX_BATCH} schedules')
    now = datetime.now(UTC)
    request_id = uuid.uuid4()
    answers: list[Any] = [None] * len(items)
    records: list[SchedulePut] = []
    where: list[int] = []
    for i, item in enumerate(items):
        key = item.get("key") if isinstance(item, dict) else None
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            answers[i] = (422, {"error": "invalid key", "details": [{"loc": ["items", i, "key"]}]})
            continue
        try:
            body = _parse_put({k: v for k, v in item.items() if k != "key"})
        except ValidationError as exc:
            answers[i] = (
                422,
                {"key": key, "error": "invalid schedule", "details": _details(exc, ("items", i))},
            )
            continue
        except ValueError as exc:
            answers[i] = (422, {"key": key, "error": str(exc), "details": [{"loc": ["items", i, "run_at"]}]})
            continue
        # one uuid per request, not per item (uuid4 reads the OS's random source each time)
        event_id = f"sched:{request_id}.{i}" if idem is None else _event_id("put", key, f"{idem}:{i}")
        records.append(_put_record(key, body, event_id, now))
        where.append(i)
    if records:
        got = await _submit(request, records)
        if len(got) == 1 and isinstance(got[0], web.Response) and len(records) > 1:
            return got[0]
        for i, answer in zip(where, got, strict=True):
            answers[i] = answer
    out = []
    for answer in answers:
        if isinstance(answer, web.Response):
            return answer
        status, body = answer
        out.append({"code": status, **body})
    return web.json_response({"items": out}, dumps=_dumps)


def _dumps(body: Any) -> str:
    return orjson.dumps(body).decode()


@routes.get("/v1/schedules/{key}")
async def get_schedule(request: web.Request) -> web.Response:
    """A schedule: status, attempts, last error, and its history."""
    key = _key(request)
    if isinstance(key, web.Response):
        return key
    pool = request.app[CONTEXT].store.pool
    row = await pool.fetchrow("SELECT * FROM schedules WHERE key = $1", key)
    if row is None:
        return error(404, "no such schedule", key=key)
    history = await pool.fetch(
        "SELECT version, kind, at, detail FROM schedule_history WHERE key = $1"
        " ORDER BY at, version LIMIT 500",
        key,
    )
    body = view(schedule_of(row))
    body["history"] = [
        {"version": h["version"], "kind": h["kind"], "at": h["at"].isoformat(), "detail": h["detail"]}
        for h in history
    ]
    return web.json_response(body)


def encode_cursor(run_at: datetime, key: str) -> str:
    """The keyset cursor after (run_at, key)."""
    return base64.urlsafe_b64encode(orjson.dumps([run_at.isoformat(), key])).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of encode_cursor; ValueError for anything that is not one of ours."""
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not (isinstance(decoded, list) and len(decoded) == 2):
            raise TypeError("not a pair")
        at_text, key = decoded
        if not (isinstance(at_text, str) and isinstance(key, str) and KEY_PATTERN.fullmatch(key)):
            raise TypeError("not a time and a key")
        at = datetime.fromisoformat(at_text)
        if at.tzinfo is None:
            raise ValueError("time without offset")
        return at, key
    except Exception as exc:
        raise ValueError("cursor is not valid") from exc


_LIST = """
SELECT * FROM schedules
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR event_type = $2)
  AND ($3::timestamptz IS NULL OR (run_at, key) > ($3, $4::text))
ORDER BY run_at, key LIMIT $5
"""


@routes.get("/v1/schedules")
async def list_schedules(request: web.Request) -> web.Response:
    """A page of schedules by run_at, filtered by status and event_type; `next_cursor` pages on."""
    q = request.query
    status = q.get("status") or None
    if status is not None and status not in {s.value for s in Status}:
        return error(400, f"status must be one of {', '.join(s.value for s in Status)}")
    try:
        limit = int(q.get("limit", "100"))
    except ValueError:
        return error(400, "limit must be an integer")
    if not 1 <= limit <= 1000:
        return error(400, "limit must be between 1 and 1000")
    try:
        after = decode_cursor(q["cursor"]) if q.get("cursor") else None
    except ValueError as exc:
        return error(400, str(exc))
    rows = await request.app[CONTEXT].store.pool.fetch(
        _LIST,
        status,
        q.get("event_type") or None,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    items = [view(schedule_of(r)) for r in rows[:limit]]
    next_cursor = (
        encode_cursor(rows[limit - 1]["run_at"], rows[limit - 1]["key"]) if len(rows) > limit else None
    )
    return web.json_response({"items": items, "next_cursor": next_cursor})


_CLEANUP = """
WITH gone AS (
  DELETE FROM schedules WHERE key IN (
    SELECT key FROM schedules WHERE status = $1 AND updated_at < $2 ORDER BY updated_at LIMIT $3
  ) AND status = $1 AND updated_at < $2
  RETURNING key
), history AS (
  DELETE FROM schedule_history h USING gone WHERE h.key = gone.key
)
SELECT count(*) FROM gone
"""


@routes.delete("/v1/schedules")
async def cleanup(request: web.Request) -> web.Response:
    """Delete finished schedules (status succeeded, failed or cancelled) last changed before
    `before`, at most 10,000 per call (`more: true`: call again)."""
    q = request.query
    status = q.get("status")
    if status not in {s.value for s in FINAL}:
        return error(400, "status must be one of succeeded, failed, cancelled")
    try:
        before = datetime.fromisoformat(q.get("before", ""))
        if before.tzinfo is None:
            raise ValueError("no offset")
    except ValueError:
        return error(400, "before must be an ISO-8601 time with its offset")
    limit = 10_000
    deleted = await request.app[CONTEXT].store.pool.fetchval(_CLEANUP, status, before, limit)
    return web.json_response({"deleted": deleted, "more": deleted == limit})
