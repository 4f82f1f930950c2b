"""Admin API (bearer token): conversations, messages, audit log, commands."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, Field, TypeAdapter

from api.context import CONTEXT, Context, error, validated_body
from api.ingress import KafkaUnavailable
from channels import normalize
from domain.lifecycle import CloseReason
from streams.records import AcceptCommand, CloseCommand, keyed
from streams.store import decode_cursor

routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M")


def bearer_token(header: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive,
    RFC 9110), or None for any other scheme or shape."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        return None
    return credentials


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1 route needs `Authorization: Bearer $PARLEY_ADMIN_TOKEN`."""
    if request.path.startswith("/v1/"):
        token = request.app[CONTEXT].settings.admin_token
        given = bearer_token(request.headers.get("Authorization"))
        if not token or given is None or not hmac.compare_digest(given.encode(), token.encode()):
            return error(401, "missing or wrong bearer token")
    return await handler(request)


IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


def command_event_id(route: str, conversation_id: str, idempotency_key: str | None) -> str:
    """The event id of an admin command: random, or derived from the caller's Idempotency-Key
    (per route and conversation), so a retried command has the same id and the worker's ledger
    applies it once."""
    if idempotency_key is None:
        return f"cmd:{uuid.uuid4()}"
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"cmd:{route}:{conversation_id}:{digest}"


def _idempotency_key(request: web.Request) -> str | web.Response | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        return error(400, f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters")
    return key


def path_uuid(request: web.Request) -> str | None:
    """The route's `{id}` as a canonical uuid, or None when it is not one (answered 404)."""
    try:
        return str(uuid.UUID(request.match_info["id"]))
    except ValueError:
        return None


@routes.get("/v1/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    """A page of conversations filtered by contact, channel, state and close reason, newest first."""
    q = request.query
    try:
        limit = int(q.get("limit", "50"))
        cursor = decode_cursor(q["cursor"]) if q.get("cursor") else None
    except ValueError as exc:
        return error(400, str(exc) if "cursor" in str(exc) else "limit must be an integer")
    if not 1 <= limit <= 500:
        return error(400, "limit must be between 1 and 500")
    items, next_cursor = await request.app[CONTEXT].store.conversations(
        contact=q.get("contact"),
        channel=q.get("channel"),
        state=q.get("state"),
        limit=limit,
        cursor=cursor,
        reason=q.get("reason"),
    )
    return web.json_response({"items": items, "next_cursor": next_cursor})


@routes.get("/v1/conversations/{id}")
async def get_conversation(request: web.Request) -> web.Response:
    """One conversation."""
    conv_id = path_uuid(request)
    found = await request.app[CONTEXT].store.conversation(conv_id) if conv_id else None
    return web.json_response(found) if found else error(404, "no such conversation")


@routes.get("/v1/conversations/{id}/messages")
async def get_messages(request: web.Request) -> web.Response:
    """A conversation's messages in order."""
    conv_id = path_uuid(request)
    store = request.app[CONTEXT].store
    if not conv_id or not await store.conversation(conv_id):
        return error(404, "no such conversation")
    return web.json_response({"items": await store.messages(conv_id)})


@routes.get("/v1/conversations/{id}/events")
async def get_events(request: web.Request) -> web.Response:
    """A conversation's audit log: every transition and every losing attempt."""
    conv_id = path_uuid(request)
    store = request.app[CONTEXT].store
    if not conv_id or not await store.conversation(conv_id):
        return error(404, "no such conversation")
    return web.json_response({"items": await store.events(conv_id)})


class CloseIn(BaseModel):
    """POST /v1/conversations/{id}/close body."""

    reason: CloseReason = CloseReason.AGENT_CLOSED
    by: str | None = None


class AcceptIn(BaseModel):
    """POST /v1/conversations/{id}/accept body."""

    agent_id: str


CLOSE_IN = TypeAdapter(CloseIn)
ACCEPT_IN = TypeAdapter(AcceptIn)


class OutboundIn(BaseModel):
    """POST /v1/conversations/{id}/messages body: a message the business sent via the provider."""

    provider_message_id: str = Field(min_length=1, max_length=256)
    type: str = "text"
    text: str | None = Field(None, max_length=65536)
    payload: dict[str, Any] = Field(default_factory=dict)


OUTBOUND_IN = TypeAdapter(OutboundIn)


async def _command(
    request: web.Request, route: str, build: Callable[[dict[str, Any], str], Any]
) -> web.Response:
    ctx = request.app[CONTEXT]
    idempotency_key = _idempotency_key(request)
    if isinstance(idempotency_key, web.Response):
        return idempotency_key
    conv_id = path_uuid(request)
    conv = await ctx.store.conversation(conv_id) if conv_id else None
    if conv is None:
        return error(404, "no such conversation")
    record = build(conv, command_event_id(route, conv["id"], idempotency_key))
    refused = await produce(ctx, record, "the command")
    return refused or web.json_response({"accepted": record.event_id}, status=202)


async def produce(ctx: Context, record: Any, what: str) -> web.Response | None:
    """Put a command on its conversation's partition (acks=all); the 4xx/503 when it cannot go."""
    key, value = keyed(record)
    try:
        normalize.check_record(key, value, what)
    except normalize.IngressError as exc:
        return error(exc.status, str(exc))
    try:
        await ctx.ingress.send(ctx.topics.conversation_events, key, value)
    except KafkaUnavailable:
        return error(503, "event log unavailable, retry later")
    return None


@routes.post("/v1/conversations/{id}/close")
async def close_conversation(request: web.Request) -> web.Response:
    """Ask to close; the lifecycle agent decides in order with everything else (202)."""
    body = await validated_body(request, CLOSE_IN)
    if isinstance(body, web.Response):
        return body
    if not body.reason.is_explicit:
        return error(422, f"reason {body.reason} is automatic; use failed, user_closed or agent_closed")
    return await _command(
        request,
        "close",
        lambda conv, event_id: CloseCommand(
            event_id=event_id,
            channel_id=conv["channel_id"],
            contact_id=conv["contact_id"],
            conversation_id=conv["id"],
            reason=body.reason,
            by=body.by,
            issued_at=datetime.now(UTC),
        ),
    )


@routes.post("/v1/conversations/{id}/accept")
async def accept_conversation(request: web.Request) -> web.Response:
    """An agent takes the conversation (-> processing), through the event log (202)."""
    body = await validated_body(request, ACCEPT_IN)
    if isinstance(body, web.Response):
        return body
    return await _command(
        request,
        "accept",
        lambda conv, event_id: AcceptCommand(
            event_id=event_id,
            channel_id=conv["channel_id"],
            contact_id=conv["contact_id"],
            conversation_id=conv["id"],
            agent_id=body.agent_id,
            issued_at=datetime.now(UTC),
        ),
    )
