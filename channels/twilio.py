"""Twilio Programmable Messaging webhooks: inbound messages, status callbacks, X-Twilio-Signature.

Pure: the caller decodes the form body and rebuilds the public URL; nothing here does IO.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from channels.signatures import SignatureError

SIGNATURE_HEADER = "X-Twilio-Signature"
_WHATSAPP_PREFIX = "whatsapp:"
_MEDIA_KINDS = frozenset({"image", "audio", "video"})
# Statuses that describe an inbound message rather than one we sent.
_INBOUND_STATUSES = frozenset({"received", "receiving"})


@dataclass(frozen=True)
class TwMessage:
    """One inbound SMS/MMS or WhatsApp message."""

    account_sid: str
    contact_id: str  # From without a "whatsapp:" prefix; payload["channel"] keeps the kind
    to: str  # To without a "whatsapp:" prefix (payload["To"] has it as sent)
    provider_message_id: str  # MessageSid
    type: str  # text, image, audio, video, document, location or button
    text: str | None
    # Every form param as received except the one `text` was copied from (Body or ButtonText:
    # stored once, not twice), plus "media" and "channel".
    payload: dict[str, Any]


@dataclass(frozen=True)
class TwStatus:
    """A status callback for a message we sent."""

    account_sid: str
    recipient_id: str  # To without a "whatsapp:" prefix
    provider_message_id: str
    status: str  # MessageStatus as given
    error_code: str | None
    error_message: str | None
    payload: dict[str, Any]  # every form param as received


class TwilioPayloadError(ValueError):
    """The form is not a message or status callback we can read; the message names the param."""


def parse_form(form: Mapping[str, str]) -> TwMessage | TwStatus:
    """Read a decoded webhook form as an inbound message or a status callback."""
    status = form.get("MessageStatus")
    # A delivery report never describes an inbound message, even if some channel adds Body to it;
    # checking it first keeps a receipt from becoming a message "from" our own number.
    if status and status not in _INBOUND_STATUSES:
        return _status(form, status)
    inbound = (
        "Body" in form or "NumMedia" in form or form.get("SmsStatus") == "received" or status == "received"
    )
    if inbound:
        return _message(form)
    if status:
        return _status(form, status)
    raise TwilioPayloadError(
        "neither an inbound message (Body or NumMedia) nor a status callback (MessageStatus)"
    )


def expected_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """base64(HMAC-SHA1(auth_token, url + every param name and value, sorted by name))."""
    signed = url + "".join(key + params[key] for key in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signed_urls(url: str) -> list[str]:
    """The forms of the public URL a Twilio signature may cover, as twilio's RequestValidator tries.

    Twilio signs the URL it requested, but not consistently with or without the port: its own
    validator accepts the URL without any port and the URL with its port (the scheme's default,
    443 or 80, added when the URL has none). The same two forms, and nothing else, are tried here.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return [url]
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    default = 443 if parts.scheme == "https" else 80
    without = parts._replace(netloc=host).geturl()
    with_port = parts._replace(netloc=f"{host}:{port if port is not None else default}").geturl()
    return list(dict.fromkeys([url, without, with_port]))


def verify_signature(auth_token: str, url: str, params: Mapping[str, str], header: str | None) -> None:
    """Raise SignatureError unless the header matches; url is the public URL Twilio requested."""
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    # Bytes, because compare_digest refuses non-ASCII str and a forged header must fail as a mismatch.
    given = header.strip().encode("utf-8", "replace")
    matches = [
        hmac.compare_digest(given, expected_signature(auth_token, form, params).encode())
        for form in signed_urls(url)
    ]
    if not any(matches):
        raise SignatureError("signature does not match")


def _message(form: Mapping[str, str]) -> TwMessage:
    account_sid = _required(form, "AccountSid")
    message_sid = _message_sid(form)
    sender = _required(form, "From")
    to = _required(form, "To")
    media = _media(form)
    kind = _kind(form, media)
    text, source = _text(form, kind)
    payload: dict[str, Any] = {k: v for k, v in form.items() if k != source}
    payload["media"] = media
    payload["channel"] = "whatsapp" if sender.startswith(_WHATSAPP_PREFIX) else "sms"
    return TwMessage(
        account_sid=account_sid,
        contact_id=sender.removeprefix(_WHATSAPP_PREFIX),
        to=to.removeprefix(_WHATSAPP_PREFIX),
        provider_message_id=message_sid,
        type=kind,
        text=text,
        payload=payload,
    )


def _status(form: Mapping[str, str], status: str) -> TwStatus:
    return TwStatus(
        account_sid=_required(form, "AccountSid"),
        recipient_id=_required(form, "To").removeprefix(_WHATSAPP_PREFIX),
        provider_message_id=_message_sid(form),
        status=status,
        error_code=form.get("ErrorCode") or None,
        error_message=form.get("ErrorMessage") or None,
        payload=dict(form),
    )


def _media(form: Mapping[str, str]) -> list[dict[str, str]]:
    raw = form.get("NumMedia", "0")
    # Twilio allows at most 10 media per message; the length cap keeps int() away from huge strings.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise TwilioPayloadError(f"NumMedia must be a non-negative integer (got {raw[:20]!r})")
    count = int(raw)
    media = []
    for i in range(count):
        # Stops at the first gap, so an absurd NumMedia costs one lookup, not a long loop.
        url = form.get(f"MediaUrl{i}")
        content_type = form.get(f"MediaContentType{i}")
        if not url or not content_type:
            missing = f"MediaUrl{i}" if not url else f"MediaContentType{i}"
            raise TwilioPayloadError(f"{missing} is missing but NumMedia is {count}")
        media.append({"url": url, "content_type": content_type})
    return media


def _kind(form: Mapping[str, str], media: list[dict[str, str]]) -> str:
    if form.get("ButtonText"):
        return "button"
    if form.get("Latitude") and form.get("Longitude"):
        return "location"
    if not media:
        return "text"
    main_type = media[0]["content_type"].split("/", 1)[0].strip().lower()
    return main_type if main_type in _MEDIA_KINDS else "document"


def _text(form: Mapping[str, str], kind: str) -> tuple[str | None, str | None]:
    """(the text, the param it was copied from, which the payload then leaves out)."""
    body = form.get("Body", "")
    if kind == "button":
        return form["ButtonText"], "ButtonText"
    if body or kind == "text":
        return body, "Body" if "Body" in form else None
    if kind == "location":
        # Same rule as the WhatsApp Cloud parser: the place's name/address, else the coordinates.
        named = [v for v in (form.get("Label"), form.get("Address")) if v]
        return (", ".join(named) if named else f"{form['Latitude']},{form['Longitude']}"), None
    return None, None


def _message_sid(form: Mapping[str, str]) -> str:
    # SmsSid is the deprecated twin of MessageSid that Twilio still sends.
    sid = form.get("MessageSid") or form.get("SmsSid")
    if not sid:
        raise TwilioPayloadError("MessageSid (or SmsSid) is missing")
    return sid


def _required(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise TwilioPayloadError(f"{name} is missing")
    return value
