"""Webhook signature checks. Pure: the clock is a parameter, comparisons are constant-time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import datetime, timedelta


class SignatureError(Exception):
    """The request is not signed by the channel's secret; the message says why."""


def standard_webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (`whsec_<base64>`); ValueError if it has none.

    Accepts what the Standard Webhooks libraries accept from a well-formed secret: standard
    base64, padded or not (they append "==" before decoding). Stricter than them on purpose in
    one way: characters outside the base64 alphabet (e.g. URL-safe "-" and "_") are refused,
    where Python's lenient b64decode would silently drop them and yield a different key.
    Channel registration validates secrets with this same function.
    """
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("secret must be whsec_ followed by standard base64") from exc
    if not key:
        raise ValueError("secret must not be empty")
    return key


def sign_standard_webhook(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for a body (used by tests and benchmarks)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify_standard_webhook(
    key: bytes,
    *,
    msg_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: datetime,
    tolerance: timedelta,
) -> None:
    """Raise SignatureError unless one v1 signature matches and the timestamp is fresh."""
    if not msg_id or not timestamp or not signature:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent = int(timestamp)
    except ValueError as exc:
        raise SignatureError("webhook-timestamp is not an integer") from exc
    skew = now.timestamp() - sent
    if skew > tolerance.total_seconds():
        raise SignatureError("webhook-timestamp is too old")
    if -skew > tolerance.total_seconds():
        raise SignatureError("webhook-timestamp is in the future")
    expected = sign_standard_webhook(key, msg_id, sent, body).encode()
    # The header may carry several space-separated signatures (key rotation).
    for candidate in signature.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise SignatureError("no signature matches")
