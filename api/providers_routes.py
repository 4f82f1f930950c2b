"""WhatsApp Cloud API and Twilio ingress: verify, normalize, produce, and only then answer 2xx.

Each message and each status in a webhook becomes its own event keyed by its thread. Items a
correctly signed payload carries but that cannot be read are parked on the dead-letter topic with
the raw body (a 4xx would only make the provider retry the same bytes forever).
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from api.context import CONTEXT, Context, error
from api.deadletters import REDRIVERS
from api.ingress import KafkaUnavailable
from channels import normalize, outbound, twilio, whatsapp
from channels.signatures import SignatureError
from streams.records import DeadLetter, InboundMessage, StatusReceipt, keyed

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

Event = tuple[bytes, bytes]
_NOBODYS_TOKEN = secrets.token_hex(32)


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
    channels: dict[str, tuple[str, tuple[str, ...]]], batch: whatsapp.WaBatch, now: datetime, raw: bytes
) -> tuple[list[Event], list[DeadLetter]]:
    """The events of a verified body (each checked to fit in a record) and at most ONE letter.

    Raises IngressError(413) when an item would not fit in a Kafka record.
    """
    events: list[Event] = []
    for m in batch.messages:
        channel_id = channels[m.phone_number_id][0]
        sent_at, fell_back = normalize.provider_time(m.sent_at, now)
        if fell_back:
            log.warning(
                "whatsapp: message %s timestamp %s is implausible, using the receipt time",
                m.provider_message_id[:100],
                m.sent_at,
            )
        rec = InboundMessage(
            event_id=f"whatsapp:{channel_id}:{m.provider_message_id}",
            channel_id=channel_id,
            contact_id=m.contact_id,
            provider="whatsapp",
            provider_message_id=m.provider_message_id,
            type=m.type,
            text=m.text,
            payload=m.payload,
            sent_at=sent_at,
            received_at=now,
        )
        events.append(_fitting(rec, f"message {m.provider_message_id[:100]!r}"))
    for st in batch.statuses:
        channel_id = channels[st.phone_number_id][0]
        at, fell_back = normalize.provider_time(st.at, now)
        if fell_back:
            log.warning(
                "whatsapp: status of %s has an implausible timestamp %s", st.provider_message_id[:100], st.at
            )
        receipt = StatusReceipt(
            event_id=f"status:{channel_id}:{st.provider_message_id}:{st.status}",
            channel_id=channel_id,
            contact_id=st.recipient_id,
            provider="whatsapp",
            provider_message_id=st.provider_message_id,
            provider_status=st.status,
            provider_at=at,
            errors=list(st.errors),
            payload=st.payload,
            received_at=now,
            message_id=parley_message_id(st.payload.get("biz_opaque_callback_data")),
        )
        events.append(_fitting(receipt, f"status of {st.provider_message_id[:100]!r}"))
    for err in batch.errors:
        log.warning(
            "whatsapp: provider error for phone_number_id=%s: %s %s", err.phone_number_id, err.code, err.title
        )
    if not batch.unparseable:
        return events, []
    for bad in batch.unparseable:
        log.error(
            "whatsapp: unreadable %s for phone_number_id=%s: %s", bad.kind, bad.phone_number_id, bad.error
        )
    # One letter per body, whatever the number of unreadable items: the body holds them all.
    ids = sorted({bad.phone_number_id for bad in batch.unparseable if bad.phone_number_id is not None})
    letter = DeadLetter.bounded(
        source_topic="webhook:whatsapp",
        partition=-1,
        offset=-1,
        key=",".join(ids) or None,
        raw=raw,
        error="; ".join(f"{bad.kind} {bad.error}" for bad in batch.unparseable),
        attempts=1,
        failed_at=now,
    )
    return events, [letter]


def _fitting(event: InboundMessage | StatusReceipt, what: str) -> Event:
    key, value = keyed(event)
    normalize.check_record(key, value, what)
    return key, value


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
            return f"unknown phone_number_id {pid[:100]!r}"
        found[pid] = (channel[0], tuple(channel[1]["app_secrets"]))
    return found


def _read_envelope(raw: bytes) -> whatsapp.WaBatch:
    """Decode a verified body: IngressError (400 JSON, 422 depth or envelope) with the reason."""
    body = normalize.load_json(raw)
    body, replaced = normalize.scrub_nul(body)
    if replaced:
        log.warning("whatsapp: %d string(s) held NUL (\\u0000), replaced by U+FFFD", replaced)
    try:
        return whatsapp.parse_envelope(body)
    except whatsapp.EnvelopeError as exc:
        raise normalize.IngressError(422, f"not a WhatsApp webhook envelope: {exc}") from exc


_REJECTED = "signature rejected"  # the one answer of every unverified WhatsApp request


def _verify_any(verify: Callable[..., None], candidates: Sequence[str], *args: Any) -> None:
    """verify(secret, *args) for each secret until one passes; the last SignatureError otherwise."""
    rejected = SignatureError("no active secret")
    for secret in candidates:
        try:
            return verify(secret, *args)
        except SignatureError as exc:
            rejected = exc
    raise rejected


@routes.post("/webhooks/whatsapp")
async def whatsapp_webhook(request: web.Request) -> web.Response:
    """Meta's envelope: every message and status becomes its own event.

    The signature is checked before anything parses the body or asks Postgres: the header's
    shape first, then the app secrets of the phone_number_ids the raw body names (found with a
    byte search, looked up through the channel cache). Unsigned, wrongly signed and unknown-number
    requests all get the same 401, and nothing about the body's schema.
    """
    ctx = request.app[CONTEXT]
    raw = await request.read()
    header = request.headers.get(whatsapp.SIGNATURE_HEADER)
    try:
        whatsapp.check_signature_header(header)
    except SignatureError as exc:
        log.warning("whatsapp webhook rejected: %s", exc)
        return error(401, _REJECTED)
    claimed = whatsapp.claimed_phone_number_ids(raw)
    if claimed is None:
        log.warning(
            "whatsapp webhook rejected: names over %d phone_number_ids", whatsapp.MAX_PHONE_NUMBER_IDS
        )
        return error(401, _REJECTED)
    if not claimed:
        # No "messages" change (e.g. account updates): nothing to verify against, nothing to produce.
        return web.json_response({"accepted": 0, "parked": 0})
    channels = await _whatsapp_channels(ctx, claimed)
    if isinstance(channels, str):
        log.warning("whatsapp webhook rejected: %s", channels)
        return error(401, _REJECTED)
    # One app signs the whole body; every phone number in it must belong to that app's secret.
    try:
        for _, app_secrets in channels.values():  # any active secret (several during a rotation)
            _verify_any(whatsapp.verify_signature, app_secrets, raw, header)
    except SignatureError as exc:
        log.warning("whatsapp webhook rejected for %s: %s", sorted(channels), exc)
        return error(401, _REJECTED)
    now = datetime.now(UTC)
    try:
        batch = _read_envelope(raw)
        if not batch.phone_number_ids() <= channels.keys():
            # Only a crafted body (e.g. an escaped key) names a number the byte search did not see.
            log.warning("whatsapp webhook rejected: names numbers its signature did not cover")
            return error(401, _REJECTED)
        events, letters = _wa_events(channels, batch, now, raw)
    except normalize.IngressError as exc:
        log.warning("whatsapp webhook refused (%d): %s", exc.status, exc)
        return error(exc.status, str(exc))
    try:
        await _produce(ctx, events, letters)
    except KafkaUnavailable as exc:
        log.error("whatsapp webhook not accepted, Kafka unavailable (%d events): %s", len(events), exc)
        return error(503, "event log unavailable, retry later")
    return web.json_response({"accepted": len(events), "parked": len(letters)})


def parley_message_id(value: object) -> str | None:
    """Parley's id of a message it sent, as a provider echoes it (biz_opaque_callback_data, the
    status callback URL); None unless it is one of ours (a uuid)."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _tw_event(
    channel_id: str, item: twilio.TwMessage | twilio.TwStatus, now: datetime, message_id: str | None = None
) -> Event:
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
        return _fitting(rec, f"message {item.provider_message_id[:100]!r}")
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
        message_id=parley_message_id(message_id),
    )
    return _fitting(receipt, f"status of {item.provider_message_id[:100]!r}")


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
    # An unknown account is checked against a token nobody has: it fails like a wrong signature.
    channel_id, config = channel or ("", {"auth_tokens": [_NOBODYS_TOKEN], "public_url": ""})
    # A status callback of a message Parley sent was called at the URL the sender gave Twilio
    # (public_url plus Parley's message id, channels/outbound.py), and Twilio signed that URL.
    message_id = request.query.get(outbound.CALLBACK_PARAM)
    signed_url = config["public_url"]
    if message_id is not None and signed_url:
        signed_url = outbound.twilio_status_callback(signed_url, message_id)
    try:
        _verify_any(  # any active auth token (several during a rotation)
            lambda tok, *a: twilio.verify_signature(tok, signed_url, *a),
            config["auth_tokens"],
            form,
            request.headers.get("X-Twilio-Signature"),
        )
    except SignatureError as exc:
        log.warning("twilio webhook rejected for account %r: %s", account[:64], exc)
        return error(401, f"signature rejected: {exc}")
    scrubbed, replaced = normalize.scrub_nul(form)
    if replaced:
        log.warning("twilio: %d form field(s) held NUL (\\u0000), replaced by U+FFFD", replaced)
    try:
        item = twilio.parse_form(scrubbed)
    except twilio.TwilioPayloadError as exc:
        return error(422, f"not a Twilio message or status callback: {exc}")
    try:
        event = _tw_event(channel_id, item, datetime.now(UTC), message_id)
    except normalize.IngressError as exc:
        log.warning("twilio webhook refused (%d): %s", exc.status, exc)
        return error(exc.status, str(exc))
    try:
        await _produce(ctx, [event], [])
    except KafkaUnavailable:
        return error(503, "event log unavailable, retry later")
    # Twilio accepts an empty TwiML document: no automatic reply.
    return web.Response(text="<Response/>", content_type="application/xml")


async def _redrive_whatsapp(ctx: Context, key: str, raw: str) -> int:
    """Re-run a parked (already verified) WhatsApp body; duplicates of what passed are no-ops."""
    body = raw.encode()
    try:
        batch = _read_envelope(body)
    except normalize.IngressError as exc:
        raise LookupError(f"parked body cannot be re-read (truncated?): {exc}") from exc
    channels = await _whatsapp_channels(ctx, batch.phone_number_ids())
    if isinstance(channels, str):
        raise LookupError(channels)
    events, letters = _wa_events(channels, batch, datetime.now(UTC), body)
    await _produce(ctx, events, letters)
    return len(events)


REDRIVERS["whatsapp"] = _redrive_whatsapp
