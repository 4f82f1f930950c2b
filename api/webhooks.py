"""Provider ingress: verify, validate, produce to Kafka, and only then answer 2xx."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson
from aiohttp import web
from pydantic import ValidationError

from api.context import CONTEXT, error
from api.ingress import KafkaUnavailable
from api.signatures import SignatureError, standard_webhook_key, verify_standard_webhook
from streams.records import GenericWebhook, InboundMessage, keyed

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.post("/webhooks/generic/{channel_id}")
async def generic_webhook(request: web.Request) -> web.Response:
    """The generic JSON channel, signed per the Standard Webhooks spec."""
    ctx = request.app[CONTEXT]
    channel_id = request.match_info["channel_id"]
    body = await request.read()  # aiohttp answers 413 past client_max_size
    channel = await ctx.channels.get(channel_id)
    if channel is None or channel[0] != "generic":
        return error(404, f"no generic channel {channel_id!r}")
    now = datetime.now(UTC)
    rejected = SignatureError("no active secret")
    for secret in channel[1]["secrets"]:  # during a rotation, the new and the previous secrets
        try:
            verify_standard_webhook(
                standard_webhook_key(secret),
                msg_id=request.headers.get("webhook-id"),
                timestamp=request.headers.get("webhook-timestamp"),
                signature=request.headers.get("webhook-signature"),
                body=body,
                now=now,
                tolerance=ctx.settings.webhook_tolerance,
            )
            break
        except SignatureError as exc:
            rejected = exc
    else:
        log.warning(
            "webhook rejected: channel=%s id=%s: %s", channel_id, request.headers.get("webhook-id"), rejected
        )
        return error(401, f"signature rejected: {rejected}")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return error(400, f"body is not valid JSON: {exc}")
    try:
        msg = GenericWebhook.model_validate(parsed)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, "body does not match the generic message schema", details=details)
    sent_at = datetime.fromtimestamp(msg.timestamp, UTC) if isinstance(msg.timestamp, int) else msg.timestamp
    record = InboundMessage(
        event_id=f"generic:{channel_id}:{msg.message_id}",
        channel_id=channel_id,
        contact_id=msg.from_,
        provider="generic",
        provider_message_id=msg.message_id,
        text=msg.text,
        sent_at=sent_at,
        received_at=now,
    )
    try:
        await ctx.ingress.send(ctx.topics.conversation_events, *keyed(record))
    except KafkaUnavailable as exc:
        log.error("webhook not accepted, Kafka unavailable: %s (%s)", record.event_id, exc)
        return error(503, "event log unavailable, retry later")
    return web.json_response({"accepted": record.event_id})
