"""Provider ingress: verify, validate, produce to Kafka, and only then answer 2xx."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from urllib.parse import quote

from aiohttp import web
from pydantic import ValidationError

from api.context import CONTEXT, error
from api.ingress import KafkaUnavailable
from channels import normalize
from channels.config import GenericWebhook
from channels.signatures import SignatureError, standard_webhook_key, verify_standard_webhook
from streams.records import InboundMessage, keyed

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# Unknown channels are checked against a key nobody has, so they fail exactly like a wrong
# signature (same answer, same HMAC work): a caller cannot probe which channel ids exist.
_NOBODYS_KEY = secrets.token_bytes(32)


def generic_event_id(channel_id: str, contact_id: str, message_id: str) -> str:
    """The dedupe id of a generic message: message ids are only unique per sender.

    Channel ids have no ':' and the contact is percent-encoded, so the id is unambiguous.
    """
    return f"generic:{channel_id}:{quote(contact_id, safe='')}:{message_id}"


def _sent_at(timestamp: datetime | int, now: datetime) -> datetime | None:
    """The sender's timestamp in UTC, or None when it is not a plausible time for this message."""
    try:
        if isinstance(timestamp, int):
            sent_at = datetime.fromtimestamp(timestamp, UTC)
        else:
            sent_at = timestamp.astimezone(UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return sent_at if normalize.in_window(sent_at, now) else None


@routes.post("/webhooks/generic/{channel_id}")
async def generic_webhook(request: web.Request) -> web.Response:
    """The generic JSON channel, signed per the Standard Webhooks spec."""
    ctx = request.app[CONTEXT]
    channel_id = request.match_info["channel_id"]
    body = await request.read()  # aiohttp answers 413 past client_max_size
    channel = await ctx.channels.get(channel_id)
    keys: list[bytes] = []
    if channel is None or channel[0] != "generic":
        log.warning("webhook for unknown generic channel %r", channel_id[:100])
    else:
        for secret in channel[1]["secrets"]:  # during a rotation, the new and the previous secrets
            try:
                keys.append(standard_webhook_key(secret))
            except ValueError:
                log.error("generic channel %s has an undecodable secret: rotate it", channel_id)
    # An unknown channel is checked against nobody's key, so it fails exactly like a bad signature.
    now = datetime.now(UTC)
    rejected = SignatureError("no active secret")
    for key in keys or [_NOBODYS_KEY]:
        try:
            verify_standard_webhook(
                key,
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
            "webhook rejected: channel=%s id=%s: %s",
            channel_id[:100],
            request.headers.get("webhook-id"),
            rejected,
        )
        return error(401, f"signature rejected: {rejected}")
    try:
        parsed = normalize.load_json(body)
    except normalize.IngressError as exc:
        return error(exc.status, str(exc))
    if normalize.has_nul(parsed):
        # Our own schema: the sender can fix it, and rewriting an id could merge two distinct ones.
        return error(422, "strings must not contain NUL (\\u0000): it cannot be stored")
    try:
        msg = GenericWebhook.model_validate(parsed)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, "body does not match the generic message schema", details=details)
    sent_at = _sent_at(msg.timestamp, now)
    if sent_at is None:
        return error(
            422,
            f"timestamp must be within {normalize.MAX_PAST.days} days before and "
            f"{normalize.MAX_FUTURE.days} day after the time it is received",
        )
    record = InboundMessage(
        event_id=generic_event_id(channel_id, msg.from_, msg.message_id),
        channel_id=channel_id,
        contact_id=msg.from_,
        provider="generic",
        provider_message_id=msg.message_id,
        text=msg.text,
        sent_at=sent_at,
        received_at=now,
    )
    key_bytes, value = keyed(record)
    try:
        normalize.check_record(key_bytes, value, "the message")
    except normalize.IngressError as exc:
        return error(exc.status, str(exc))
    try:
        await ctx.ingress.send(ctx.topics.conversation_events, key_bytes, value)
    except KafkaUnavailable as exc:
        log.error("webhook not accepted, Kafka unavailable: %s (%s)", record.event_id, exc)
        return error(503, "event log unavailable, retry later")
    return web.json_response({"accepted": record.event_id})
