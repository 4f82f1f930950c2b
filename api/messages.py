"""Outbound messages API (bearer token): send through the conversation's provider, see, retry.

`POST /v1/conversations/{id}/messages` with a content body (`{"type": "text", "text": ...}`,
media with a link, or a template) asks Parley to send: the API checks what it can know at once
(the channel can send it; free-form only inside the 24 h window), produces a `message.send` event
on the conversation's partition and answers 202 `{"id", "status": "queued"}`. The lifecycle agent
queues it in the conversation's order and the sender (agents/sender.py) sends it. With an
`Idempotency-Key` the message id is derived from the key: the same key and body again answer the
same message; another body with that key is 422.

The recording-only form stays: a body with `provider_message_id` (or `"already_sent": true`)
records a message the business sent elsewhere, so its receipts have something to update.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from api.admin import OUTBOUND_IN, _command, _idempotency_key, path_uuid, produce
from api.context import CONTEXT, Context, error, json_body
from channels import outbound
from streams import sends_db
from streams.records import OutboundMessage, SendRequested

routes = web.RouteTableDef()
SENDING = ("whatsapp", "twilio")
_NAMESPACE = uuid.UUID("6f1d3f2e-5b0c-4d5e-9a51-3c0f6d2b8e71")


class ChannelSendIn(BaseModel):
    """POST /v1/channels/{id}/messages: `to` plus the content."""

    model_config = ConfigDict(extra="allow")

    to: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9:+._@-]+$")


CHANNEL_SEND_IN = TypeAdapter(ChannelSendIn)


def _content(body: Any) -> outbound.OutboundContent | web.Response:
    try:
        return outbound.OUTBOUND_CONTENT.validate_python(body)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, "not a message this API can send", details=details)


def message_id_for(scope: str, idempotency_key: str | None) -> str:
    """Parley's id of a message: derived from the Idempotency-Key (per conversation or thread)."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_NAMESPACE, f"{scope}\n{idempotency_key}"))


async def _send(
    ctx: Context,
    *,
    channel_id: str,
    contact_id: str,
    conversation: dict[str, Any] | None,
    content: outbound.OutboundContent,
    message_id: str,
    keyed_by_client: bool,
) -> web.Response:
    channel = await ctx.channels.record(channel_id)
    if channel is None:
        return error(404, "no such channel")
    if channel.provider not in SENDING:
        return error(422, f"a {channel.provider} channel cannot send messages (whatsapp or twilio only)")
    try:
        outbound.ensure_supported(channel.provider, content)  # type: ignore[arg-type]
    except outbound.Unsupported as exc:
        return error(422, str(exc))
    if outbound.is_free_form(content):
        window = conversation.get("window_expires_at") if conversation else None
        if window is None or datetime.fromisoformat(window) <= datetime.now(UTC):
            return error(422, "outside the 24 h window: send a template", window_expires_at=window)
    data = content.model_dump(mode="json", exclude_none=True)
    digest = sends_db.body_hash(data)
    if keyed_by_client:
        async with ctx.store.pool.acquire() as conn:
            first = await sends_db.remember_request(conn, message_id, digest)
            existing = await sends_db.send_row(conn, message_id)
        if first != digest:
            return error(422, "this Idempotency-Key was used with another body", id=message_id)
        if existing is not None:
            return web.json_response({"id": message_id, "status": existing["status"]}, status=202)
    record = SendRequested(
        event_id=f"send:{message_id}",
        message_id=message_id,
        channel_id=channel_id,
        contact_id=contact_id,
        conversation_id=conversation["id"] if conversation else None,
        content=data,
        body_hash=digest,
        requested_at=datetime.now(UTC),
    )
    refused = await produce(ctx, record, "the message")
    return refused or web.json_response({"id": message_id, "status": "queued"}, status=202)


@routes.post("/v1/conversations/{id}/messages")
async def send_to_conversation(request: web.Request) -> web.Response:
    """Send a message in a conversation (202, queued), or record one sent elsewhere (202)."""
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    if isinstance(body, dict) and ("provider_message_id" in body or body.get("already_sent") is True):
        return await _record(request, {k: v for k, v in body.items() if k != "already_sent"})
    content = _content(body)
    if isinstance(content, web.Response):
        return content
    ctx = request.app[CONTEXT]
    key = _idempotency_key(request)
    if isinstance(key, web.Response):
        return key
    conv_id = path_uuid(request)
    conv = await ctx.store.conversation(conv_id) if conv_id else None
    if conv is None:
        return error(404, "no such conversation")
    return await _send(
        ctx,
        channel_id=conv["channel_id"],
        contact_id=conv["contact_id"],
        conversation=conv,
        content=content,
        message_id=message_id_for(f"conversation:{conv['id']}", key),
        keyed_by_client=key is not None,
    )


@routes.post("/v1/channels/{id}/messages")
async def send_from_channel(request: web.Request) -> web.Response:
    """A business-initiated message to `to` (a template outside the window): joins the thread's
    open conversation or opens one (202, queued)."""
    body = await json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        routing = CHANNEL_SEND_IN.validate_python(body)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, "body does not match ChannelSendIn", details=details)
    content = _content({k: v for k, v in body.items() if k != "to"})
    if isinstance(content, web.Response):
        return content
    ctx = request.app[CONTEXT]
    key = _idempotency_key(request)
    if isinstance(key, web.Response):
        return key
    channel_id = request.match_info["id"]
    channel = await ctx.channels.record(channel_id)
    if channel is None:
        return error(404, "no such channel")
    contact_id = outbound.contact_for(channel.provider, routing.to)  # as inbound messages name it
    latest = await ctx.store.thread_conversation(channel_id, contact_id)
    current = latest if latest is not None and latest["state"] != "closed" else None
    return await _send(
        ctx,
        channel_id=channel_id,
        contact_id=contact_id,
        conversation=current,
        content=content,
        message_id=message_id_for(f"thread:{channel_id}/{contact_id}", key),
        keyed_by_client=key is not None,
    )


async def _record(request: web.Request, body: Any) -> web.Response:
    """The recording-only form (see the module docstring)."""
    try:
        rec = OUTBOUND_IN.validate_python(body)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, "body does not match OutboundIn", details=details)
    # Already idempotent by the provider's message id; an Idempotency-Key is validated but the id
    # stays the message's, so two keys can never record the same sent message twice.
    return await _command(
        request,
        "messages",
        lambda conv, event_id: OutboundMessage(
            event_id=f"outbound:{conv['channel_id']}:{rec.provider_message_id}",
            channel_id=conv["channel_id"],
            contact_id=conv["contact_id"],
            conversation_id=conv["id"],
            provider_message_id=rec.provider_message_id,
            type=rec.type,
            text=rec.text,
            payload=rec.payload,
            sent_at=datetime.now(UTC),
        ),
    )


@routes.get("/v1/messages/{id}")
async def get_message(request: web.Request) -> web.Response:
    """A sent (or queued, or failed) message: status, attempts, provider id, error."""
    message_id = path_uuid(request)
    if message_id is None:
        return error(404, "no such message")
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        row = await sends_db.send_row(conn, message_id)
    return web.json_response(sends_db.send_json(row)) if row else error(404, "no such message")


@routes.post("/v1/messages/{id}/retry")
async def retry_message(request: web.Request) -> web.Response:
    """Send a failed message again now, with a fresh retry budget (202); 409 unless failed."""
    message_id = path_uuid(request)
    if message_id is None:
        return error(404, "no such message")
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        row = await sends_db.retry_send(conn, message_id, datetime.now(UTC))
        if row is None:
            found = await sends_db.send_row(conn, message_id)
            if found is None:
                return error(404, "no such message")
            return error(409, f"only a failed message can be retried; this one is {found['status']}")
    return web.json_response(sends_db.send_json(row), status=202)
