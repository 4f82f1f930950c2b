"""WhatsApp Cloud API and Twilio ingress: verify, normalize, produce, and only then answer 2xx.

Each message and each status in a webhook becomes its own event keyed by its thread. Items a
correctly signed payload carries but that cannot be read are parked on the dead-letter topic with
the raw body (a 4xx would only make the provider retry the same bytes forever).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from api.context import CONTEXT, Context, error
from api.deadletters import REDRIVERS
from api.ingress import KafkaUnavailable
from api.providers import twilio, whatsapp
from api.signatures import SignatureError
from streams.records import DeadLetter, InboundMessage, StatusReceipt, keyed

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

Event = tuple[bytes, bytes]


@routes.get("/webhooks/whatsapp")
async def whatsapp_verify(request: web.Request) -> web.Response:
    """Meta's subscription handshake: echo hub.challenge when hub.verify_token is a channel's."""
    q = request.query
    token = q.get("hub.verify_token", "")
    if q.get("hub.mode") != "subscribe" or not token or "hub.challenge" not in q:
        return error(400, "expected hub.mode=subscribe, hub.verify_token and hub.challenge")
    found = await request.app[CONTEXT].channels.get_by("whatsapp", "verify_token", token)  # constant-time
    if found is None:
        return error(403, "verify token does not match any WhatsApp channel")
    return web.Response(text=q["hub.challenge"], content_type="text/plain")


def _wa_events(
    channels: dict[str, tuple[str, tuple[str, ...]]], batch: whatsapp.WaBatch, now: datetime, raw: str
) -> tuple[list[Event], list[DeadLetter]]:
    events: list[Event] = []
    letters: list[DeadLetter] = []
    for m in batch.messages:
        channel_id = channels[m.phone_number_id][0]
        rec = InboundMessage(
            event_id=f"whatsapp:{channel_id}:{m.provider_message_id}",
            channel_id=channel_id,
            contact_id=m.contact_id,
            provider="whatsapp",
            provider_message_id=m.provider_message_id,
            type=m.type,
            text=m.text,
            payload=m.payload,
            sent_at=m.sent_at,
            received_at=now,
        )
        events.append(keyed(rec))
    for st in batch.statuses:
        channel_id = channels[st.phone_number_id][0]
        receipt = StatusReceipt(
            event_id=f"status:{channel_id}:{st.provider_message_id}:{st.status}",
            channel_id=channel_id,
            contact_id=st.recipient_id,
            provider="whatsapp",
            provider_message_id=st.provider_message_id,
            provider_status=st.status,
            provider_at=st.at,
            errors=list(st.errors),
            payload=st.payload,
            received_at=now,
        )
        events.append(keyed(receipt))
    for err in batch.errors:
        log.warning(
            "whatsapp: provider error for phone_number_id=%s: %s %s", err.phone_number_id, err.code, err.title
        )
    for bad in batch.unparseable:
        log.error(
            "whatsapp: unreadable %s for phone_number_id=%s parked: %s",
            bad.kind,
            bad.phone_number_id,
            bad.error,
        )
        letters.append(
            DeadLetter(
                source_topic="webhook:whatsapp",
                partition=-1,
                offset=-1,
                key=bad.phone_number_id,
                value=raw,
                error=f"{bad.kind}: {bad.error}",
                attempts=1,
                failed_at=now,
            )
        )
    return events, letters


async def _produce(ctx: Context, events: list[Event], letters: list[DeadLetter]) -> None:
    if events:
        await ctx.ingress.send_many(ctx.topics.conversation_events, events)
    if letters:
        parked = [((lt.key or "").encode(), lt.model_dump_json().encode()) for lt in letters]
        await ctx.ingress.send_many(ctx.topics.dead_letters, parked)


async def _whatsapp_channels(ctx: Context, ids: set[str]) -> dict[str, tuple[str, tuple[str, ...]]] | str:
    """phone_number_id -> (channel id, active app secrets), or the reason one is unknown."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for pid in sorted(ids):
        channel = await ctx.channels.get_by("whatsapp", "phone_number_id", pid)
        if channel is None:
            return f"unknown phone_number_id {pid!r}: register it with POST /v1/channels"
        found[pid] = (channel[0], tuple(channel[1]["app_secrets"]))
    return found


def _verify_any(verify: Callable[..., None], secrets: Sequence[str], *args: Any) -> None:
    """verify(secret, *args) for each secret until one passes; the last SignatureError otherwise."""
    rejected = SignatureError("no active secret")
    for secret in secrets:
        try:
            return verify(secret, *args)
        except SignatureError as exc:
            rejected = exc
    raise rejected


@routes.post("/webhooks/whatsapp")
async def whatsapp_webhook(request: web.Request) -> web.Response:
    """Meta's envelope: every message and status becomes its own event."""
    ctx = request.app[CONTEXT]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error(400, f"body is not valid JSON: {exc}")
    try:
        batch = whatsapp.parse_envelope(body)
    except whatsapp.EnvelopeError as exc:
        return error(422, f"not a WhatsApp webhook envelope: {exc}")
    if not batch.phone_number_ids():
        # Only changes we do not consume (e.g. account updates): nothing to verify or produce.
        return web.json_response({"accepted": 0, "parked": 0})
    channels = await _whatsapp_channels(ctx, batch.phone_number_ids())
    if isinstance(channels, str):
        log.warning("whatsapp webhook rejected: %s", channels)
        return error(404, channels)
    # One app signs the whole body; every phone number in it must belong to that app's secret.
    secrets = {secret for _, secret in channels.values()}
    try:
        header = request.headers.get("X-Hub-Signature-256")
        for app_secrets in secrets:  # one of each channel's active secrets (several during a rotation)
            _verify_any(whatsapp.verify_signature, app_secrets, raw, header)
    except SignatureError as exc:
        log.warning("whatsapp webhook rejected for %s: %s", sorted(channels), exc)
        return error(401, f"signature rejected: {exc}")
    events, letters = _wa_events(channels, batch, datetime.now(UTC), raw.decode(errors="replace"))
    try:
        await _produce(ctx, events, letters)
    except KafkaUnavailable as exc:
        log.error("whatsapp webhook not accepted, Kafka unavailable (%d events): %s", len(events), exc)
        return error(503, "event log unavailable, retry later")
    return web.json_response({"accepted": len(events), "parked": len(letters)})


def _tw_event(channel_id: str, item: twilio.TwMessage | twilio.TwStatus, now: datetime) -> Event:
    if isinstance(item, twilio.TwMessage):
        rec = InboundMessage(
            event_id=f"twilio:{channel_id}:{item.provider_message_id}",
            channel_id=channel_id,
            contact_id=item.contact_id,
            provider="twilio",
            provider_message_id=item.provider_message_id,
            type=item.type,
            text=item.text,
            payload=item.payload,
            sent_at=now,
            received_at=now,
        )
        return keyed(rec)
    errors = [{"code": item.error_code, "title": item.error_message}] if item.error_code else []
    receipt = StatusReceipt(
        event_id=f"status:{channel_id}:{item.provider_message_id}:{item.status}",
        channel_id=channel_id,
        contact_id=item.recipient_id,
        provider="twilio",
        provider_message_id=item.provider_message_id,
        provider_status=item.status,
        provider_at=now,
        errors=errors,
        payload=item.payload,
        received_at=now,
    )
    return keyed(receipt)


@routes.post("/webhooks/twilio")
async def twilio_webhook(request: web.Request) -> web.Response:
    """Twilio's form-encoded inbound messages and status callbacks, signed with the auth token."""
    ctx = request.app[CONTEXT]
    raw = await request.read()
    if not request.content_type.startswith("application/x-www-form-urlencoded"):
        return error(415, "expected application/x-www-form-urlencoded")
    try:
        form = dict(parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw)))
    except (ValueError, UnicodeDecodeError) as exc:
        return error(400, f"body is not a valid form: {exc}")
    account = form.get("AccountSid", "")
    channel = await ctx.channels.get_by("twilio", "account_sid", account) if account else None
    if channel is None:
        return error(404, f"unknown AccountSid {account!r}: register it with POST /v1/channels")
    channel_id, config = channel
    try:
        _verify_any(  # any active auth token (several during a rotation)
            lambda tok, *a: twilio.verify_signature(tok, config["public_url"], *a),
            config["auth_tokens"],
            form,
            request.headers.get("X-Twilio-Signature"),
        )
    except SignatureError as exc:
        log.warning("twilio webhook rejected for channel %s: %s", channel_id, exc)
        return error(401, f"signature rejected: {exc}")
    try:
        item = twilio.parse_form(form)
    except twilio.TwilioPayloadError as exc:
        return error(422, f"not a Twilio message or status callback: {exc}")
    try:
        await _produce(ctx, [_tw_event(channel_id, item, datetime.now(UTC))], [])
    except KafkaUnavailable:
        return error(503, "event log unavailable, retry later")
    # Twilio accepts an empty TwiML document: no automatic reply.
    return web.Response(text="<Response/>", content_type="application/xml")


async def _redrive_whatsapp(ctx: Context, key: str, raw: str) -> int:
    """Re-run a parked (already verified) WhatsApp body; duplicates of what passed are no-ops."""
    batch = whatsapp.parse_envelope(orjson.loads(raw))
    channels = await _whatsapp_channels(ctx, batch.phone_number_ids())
    if isinstance(channels, str):
        raise LookupError(channels)
    events, letters = _wa_events(channels, batch, datetime.now(UTC), raw)
    await _produce(ctx, events, letters)
    return len(events)


REDRIVERS["whatsapp"] = _redrive_whatsapp
