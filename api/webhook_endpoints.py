"""Outgoing webhooks API (bearer token): endpoints, their delivery log, retries and replays.

An endpoint is a URL subscribed to event types ("*" for all). Its secret (`whsec_...`) is
generated here, shown once at creation and at rotation, and stored sealed; for
PARLEY_WEBHOOK_SECRET_OVERLAP after a rotation both secrets sign (two `v1,` signatures in one
header, as Standard Webhooks allows). The sending itself is the worker's (agents/webhooks.py);
`POST .../test` is the exception: the API sends a `ping` now and returns the endpoint's answer.

URLs are checked at registration (https only unless PARLEY_OUTBOUND_ALLOW_HTTP, no userinfo, no
loopback/private/link-local address or "localhost" unless PARLEY_OUTBOUND_ALLOW_PRIVATE);
names resolving to such addresses are refused by the sender at connect time.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from agents.webhook_client import WebhookSender
from api.context import CONTEXT, Context, error, row_id, validated_body
from channels.ssrf import check_url
from domain.webhooks import ALL, EVENT_TYPE, PING, subscribed
from streams import webhooks_db as db

routes = web.RouteTableDef()
SENDER: web.AppKey[WebhookSender] = web.AppKey("parley_webhook_sender", WebhookSender)
REPLAY_CHUNK = 5000
STATUSES = ("pending", "succeeded", "failed")


def _event_types(value: list[str]) -> list[str]:
    bad = [v for v in value if v != ALL and not EVENT_TYPE.match(v)]
    if bad:
        raise ValueError(f'not an event type: {bad[0]!r} (letters, digits and ._:/- only, or "*")')
    return list(dict.fromkeys(value))  # repeats once


class EndpointIn(BaseModel):
    """POST /v1/webhook-endpoints."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000)
    events: list[str] = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=500)

    _types = field_validator("events")(_event_types)


class EndpointPatch(BaseModel):
    """PATCH /v1/webhook-endpoints/{id}: any of url, events, description, enabled."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, min_length=1, max_length=2000)
    events: list[str] | None = Field(None, min_length=1, max_length=100)
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = None

    _types = field_validator("events")(lambda v: v if v is None else _event_types(v))


class ReplayIn(BaseModel):
    """POST /v1/webhook-endpoints/{id}/replay: events published in [since, until)."""

    model_config = ConfigDict(extra="forbid")

    since: AwareDatetime
    until: AwareDatetime | None = None
    types: list[str] | None = Field(None, min_length=1, max_length=100)

    _types = field_validator("types")(lambda v: v if v is None else _event_types(v))


ENDPOINT_IN = TypeAdapter(EndpointIn)
ENDPOINT_PATCH = TypeAdapter(EndpointPatch)
REPLAY_IN = TypeAdapter(ReplayIn)


def _url_refused(ctx: Context, url: str) -> web.Response | None:
    reason = check_url(
        url, allow_http=ctx.settings.outbound_allow_http, allow_private=ctx.settings.outbound_allow_private
    )
    return None if reason is None else error(422, f"url refused: {reason}", field="url")


@routes.post("/v1/webhook-endpoints")
async def create_endpoint(request: web.Request) -> web.Response:
    """Register an endpoint: 201 with its id and its secret (shown this once)."""
    ctx = request.app[CONTEXT]
    body = await validated_body(request, ENDPOINT_IN)
    if isinstance(body, web.Response):
        return body
    refused = _url_refused(ctx, body.url)
    if refused:
        return refused
    async with ctx.store.pool.acquire() as conn:
        row, secret = await db.create_endpoint(
            conn,
            ctx.store.require_sealer(),
            url=body.url,
            events=body.events,
            description=body.description,
            now=datetime.now(UTC),
        )
    return web.json_response({**db.public(row), "secret": secret}, status=201)


@routes.get("/v1/webhook-endpoints")
async def list_endpoints(request: web.Request) -> web.Response:
    """Endpoints by id; `?limit=` (1-500) and `?cursor=` (the previous page's next_cursor)."""
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return error(400, "limit must be an integer")
    if not 1 <= limit <= 500:
        return error(400, "limit must be between 1 and 500")
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        rows = await db.endpoint_rows(conn, limit=limit, after=request.query.get("cursor"))
    items = [db.public(r) for r in rows]
    next_cursor = items[-1]["id"] if len(items) == limit else None
    return web.json_response({"items": items, "next_cursor": next_cursor})


@routes.get("/v1/webhook-endpoints/{id}")
async def get_endpoint(request: web.Request) -> web.Response:
    """One endpoint, never its secret."""
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        row = await db.endpoint_row(conn, request.match_info["id"])
    return web.json_response(db.public(row)) if row else error(404, "no such webhook endpoint")


@routes.patch("/v1/webhook-endpoints/{id}")
async def patch_endpoint(request: web.Request) -> web.Response:
    """Change url, events, description or enabled (enabling clears the failure record and sends
    what waited)."""
    ctx = request.app[CONTEXT]
    body = await validated_body(request, ENDPOINT_PATCH)
    if isinstance(body, web.Response):
        return body
    changes = body.model_dump(exclude_none=True)
    if "url" in changes and (refused := _url_refused(ctx, changes["url"])):
        return refused
    async with ctx.store.pool.acquire() as conn:
        row = await db.update_endpoint(conn, request.match_info["id"], changes, datetime.now(UTC))
    return web.json_response(db.public(row)) if row else error(404, "no such webhook endpoint")


@routes.delete("/v1/webhook-endpoints/{id}")
async def delete_endpoint(request: web.Request) -> web.Response:
    """Remove an endpoint, its deliveries and their log."""
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        found = await db.delete_endpoint(conn, request.match_info["id"])
    return web.Response(status=204) if found else error(404, "no such webhook endpoint")


@routes.post("/v1/webhook-endpoints/{id}/rotate-secret")
async def rotate_secret(request: web.Request) -> web.Response:
    """A new secret (shown this once); the old one keeps signing for the overlap."""
    ctx = request.app[CONTEXT]
    async with ctx.store.pool.acquire() as conn:
        rotated = await db.rotate_secret(
            conn,
            ctx.store.require_sealer(),
            request.match_info["id"],
            overlap=ctx.settings.webhook_secret_overlap,
            now=datetime.now(UTC),
        )
    if rotated is None:
        return error(404, "no such webhook endpoint")
    secret, until = rotated
    return web.json_response({"secret": secret, "previous_secret_until": until.isoformat()})


@routes.post("/v1/webhook-endpoints/{id}/test")
async def test_endpoint(request: web.Request) -> web.Response:
    """Send a `ping` event now, signed like every delivery, and answer with what the endpoint said."""
    ctx = request.app[CONTEXT]
    now = datetime.now(UTC)
    async with ctx.store.pool.acquire() as conn:
        row = await db.endpoint_row(conn, request.match_info["id"])
    if row is None:
        return error(404, "no such webhook endpoint")
    ep = db.endpoint_of(row, ctx.store.require_sealer, now)
    event_id = "ping_" + os.urandom(12).hex()
    body = orjson.dumps(
        {"type": PING, "id": event_id, "timestamp": now.isoformat(), "data": {"endpoint_id": ep.id}}
    )
    sent = await request.app[SENDER].send(ep.url, event_id, int(time.time()), body, ep.keys)
    return web.json_response(
        {
            "id": event_id,
            "ok": sent.ok,
            "status": sent.status,
            "latency_ms": round(sent.latency_ms, 1),
            "error": sent.error,
            "body": sent.body[: db.RESPONSE_KEPT],
        }
    )


def _page(request: web.Request) -> tuple[int, int | None] | web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
        cursor = row_id(request.query["cursor"]) if request.query.get("cursor") else None
    except ValueError:
        return error(400, "limit and cursor must be integers")
    if not 1 <= limit <= 500:
        return error(400, "limit must be between 1 and 500")
    return limit, cursor


@routes.get("/v1/webhook-endpoints/{id}/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    """An endpoint's deliveries, newest first: `?status=pending|succeeded|failed&event_type=
    &limit=&cursor=`; each with its attempt count, last answer and next attempt."""
    page = _page(request)
    if isinstance(page, web.Response):
        return page
    limit, cursor = page
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        return error(400, f"status must be one of {', '.join(STATUSES)}")
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        if await db.endpoint_row(conn, request.match_info["id"]) is None:
            return error(404, "no such webhook endpoint")
        rows = await db.deliveries(
            conn,
            request.match_info["id"],
            status=status,
            event_type=request.query.get("event_type"),
            limit=limit,
            before=cursor,
        )
    items = [db.delivery_json(r) for r in rows]
    next_cursor = str(items[-1]["id"]) if len(items) == limit else None
    return web.json_response({"items": items, "next_cursor": next_cursor})


def _delivery_id(request: web.Request) -> int | None:
    try:
        return row_id(request.match_info["id"])
    except ValueError:
        return None


@routes.get("/v1/webhook-deliveries/{id}")
async def get_delivery(request: web.Request) -> web.Response:
    """One delivery with every attempt (time, status code, latency, error, answer)."""
    delivery_id = _delivery_id(request)
    if delivery_id is None:
        return error(404, "no such delivery")
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        found = await db.delivery(conn, delivery_id)
    return web.json_response(found) if found else error(404, "no such delivery")


@routes.post("/v1/webhook-deliveries/{id}/retry")
async def retry_delivery(request: web.Request) -> web.Response:
    """Attempt a delivery again now (a parked one too), with a fresh retry schedule: 202."""
    delivery_id = _delivery_id(request)
    if delivery_id is None:
        return error(404, "no such delivery")
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        row = await db.retry_delivery(conn, delivery_id, datetime.now(UTC))
    return web.json_response(db.delivery_json(row), status=202) if row else error(404, "no such delivery")


@routes.post("/v1/webhook-endpoints/{id}/replay")
async def replay(request: web.Request) -> web.Response:
    """Send again every event of outgoing-events published in [since, until) whose type matches
    `types` (default: the endpoint's subscriptions), with its original id: 202 with the count.
    Reads the Kafka log, so it reaches events older than the endpoint (within retention)."""
    ctx = request.app[CONTEXT]
    body = await validated_body(request, REPLAY_IN)
    if isinstance(body, web.Response):
        return body
    until = body.until or datetime.now(UTC)
    if until <= body.since:
        return error(422, "until must be after since", field="until")
    async with ctx.store.pool.acquire() as conn:
        row = await db.endpoint_row(conn, request.match_info["id"])
    if row is None:
        return error(404, "no such webhook endpoint")
    types = body.types or list(row["events"])
    count = 0
    async for chunk in _read_log(ctx, body.since, until, types):
        async with ctx.store.pool.acquire() as conn:
            count += await db.replay(conn, row["id"], chunk, datetime.now(UTC))
    return web.json_response({"endpoint_id": row["id"], "count": count}, status=202)


async def _read_log(
    ctx: Context, since: datetime, until: datetime, types: list[str]
) -> AsyncIterator[list[db.Outgoing]]:
    """The outgoing-events records stored in [since, until) of these types, in chunks."""
    topic = ctx.topics.outgoing_events
    consumer = AIOKafkaConsumer(
        bootstrap_servers=ctx.settings.kafka_bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(ctx.settings.topic_partitions)]
        consumer.assign(parts)
        starts = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in parts})
        ends = await consumer.end_offsets(parts)
        until_ms = int(until.timestamp() * 1000)
        open_parts = {}
        for tp in parts:
            start = starts.get(tp)
            if start is not None and start.offset < ends[tp]:
                consumer.seek(tp, start.offset)
                open_parts[tp] = ends[tp]
            else:
                consumer.pause(tp)
        chunk: list[db.Outgoing] = []
        while open_parts:
            batches = await consumer.getmany(*open_parts, timeout_ms=1000, max_records=REPLAY_CHUNK)
            for tp, records in batches.items():
                for rec in records:
                    end = open_parts.get(tp)
                    if end is None or rec.offset >= end or rec.timestamp >= until_ms:
                        open_parts.pop(tp, None)  # past the end as it was at the start, or past until
                        break
                    parsed = orjson.loads(rec.value or b"{}")
                    if isinstance(parsed, dict) and subscribed(types, str(parsed.get("type"))):
                        event_id, event_type = str(parsed["id"]), str(parsed["type"])
                        key, value = (rec.key or b"").decode(), bytes(rec.value or b"")
                        chunk.append(db.Outgoing(event_id, event_type, key, value, tp.partition, rec.offset))
                    if rec.offset == end - 1:
                        open_parts.pop(tp, None)
            if len(chunk) >= REPLAY_CHUNK or not open_parts:
                if chunk:
                    yield chunk
                chunk = []
    finally:
        await consumer.stop()


async def sender_ctx(app: web.Application) -> AsyncIterator[None]:
    """The API's own sender, for `POST .../test`."""
    settings = app[CONTEXT].settings
    sender = WebhookSender(
        allow_http=settings.outbound_allow_http,
        allow_private=settings.outbound_allow_private,
        timeout=settings.webhook_timeout.total_seconds(),
        retry_after_cap=settings.webhook_retry_after_cap.total_seconds(),
    )
    await sender.start()
    app[SENDER] = sender
    yield
    await sender.close()
