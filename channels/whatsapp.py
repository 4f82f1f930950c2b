"""Meta WhatsApp Cloud API webhooks: the envelope parser and the X-Hub-Signature-256 check.

Pure: the caller decodes the JSON and reads the headers; nothing here does IO or reads the clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from channels.signatures import SignatureError

OBJECT = "whatsapp_business_account"
SIGNATURE_HEADER = "X-Hub-Signature-256"
_SIGNATURE_PREFIX = "sha256="
# Media types whose object may carry a caption (audio and sticker never do, but reading it is harmless).
_MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})


@dataclass(frozen=True)
class WaMessage:
    """One message a WhatsApp user sent to a business phone number."""

    phone_number_id: str
    contact_id: str  # message["from"], the user's wa_id
    provider_message_id: str  # the wamid
    type: str  # Meta's type, kept as given even when we do not know it
    text: str | None  # the human-readable part, when the type has one
    # The raw message without the field `text` was read from (stored once, not twice), plus
    # "contact_profile" (contacts[].profile) when present.
    payload: dict[str, Any]
    sent_at: datetime | None  # from message["timestamp"], UTC; None when past datetime's range


@dataclass(frozen=True)
class WaStatus:
    """A status update (sent, delivered, read, failed, ...) of a message the business sent."""

    phone_number_id: str
    recipient_id: str
    provider_message_id: str
    status: str  # as given: Meta adds values (played, deleted, ...) over time
    at: datetime | None  # None when past datetime's range
    errors: tuple[dict[str, Any], ...]
    payload: dict[str, Any]  # the raw status object


@dataclass(frozen=True)
class WaError:
    """A value-level errors[] item: a problem Meta reports that is not tied to one message."""

    phone_number_id: str | None
    code: int | None
    title: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class WaUnparseable:
    """One item inside a valid envelope that could not be read; its siblings still go through."""

    phone_number_id: str | None
    kind: Literal["message", "status"]
    error: str  # starts with the item's path, e.g. "entry[0].changes[0].value.messages[1]: id is missing"
    item: Any


@dataclass(frozen=True)
class WaBatch:
    """Everything one webhook delivery carried."""

    messages: tuple[WaMessage, ...]
    statuses: tuple[WaStatus, ...]
    errors: tuple[WaError, ...]
    unparseable: tuple[WaUnparseable, ...]
    # Set by parse_envelope: a "messages" change may carry no items at all but still names its number.
    seen_phone_number_ids: frozenset[str] = frozenset()

    def phone_number_ids(self) -> set[str]:
        """Every metadata.phone_number_id of the envelope's "messages" changes."""
        ids = set(self.seen_phone_number_ids)
        ids.update(m.phone_number_id for m in self.messages)
        ids.update(s.phone_number_id for s in self.statuses)
        ids.update(e.phone_number_id for e in self.errors if e.phone_number_id is not None)
        ids.update(u.phone_number_id for u in self.unparseable if u.phone_number_id is not None)
        return ids


_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_PHONE_KEY = b'"phone_number_id"'
_PHONE_VALUE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*"([^"\\]{1,64})"')
MAX_PHONE_NUMBER_IDS = 64


def claimed_phone_number_ids(raw: bytes) -> set[str] | None:
    """The phone_number_id values a raw body names, found without parsing it (None: too many).

    Only to pick the app secret(s) that must have signed the body before anything parses it. It
    may find an id that is not really a metadata.phone_number_id (a crafted key), never miss a
    literal one; the caller checks after parsing that every id of the envelope was covered.
    """
    found: set[str] = set()
    start = 0
    while (at := raw.find(_PHONE_KEY, start)) >= 0:
        start = at + len(_PHONE_KEY)
        value = _PHONE_VALUE.match(raw, start)
        if value is None:
            continue  # the same characters as a string value (a user typing them), not a key
        found.add(value.group(1).decode("utf-8", "replace"))
        if len(found) > MAX_PHONE_NUMBER_IDS:
            return None
    return found


class EnvelopeError(ValueError):
    """The envelope itself is malformed; the message names the exact path and what is wrong."""


class _ItemError(ValueError):
    """One message or status lacks an essential field (becomes a WaUnparseable, never escapes)."""


def sign(app_secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 header value Meta would send for this body (tests and benchmarks)."""
    return _SIGNATURE_PREFIX + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def check_signature_header(header: str | None) -> None:
    """Raise SignatureError unless the header has the shape sha256=<64 hex digits> (no HMAC yet)."""
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    if not header.startswith(_SIGNATURE_PREFIX):
        raise SignatureError(f"{SIGNATURE_HEADER} must start with {_SIGNATURE_PREFIX}")
    if not _HEX_DIGEST.fullmatch(header.removeprefix(_SIGNATURE_PREFIX).strip()):
        raise SignatureError(f"{SIGNATURE_HEADER} must be {_SIGNATURE_PREFIX} and 64 hex digits")


def verify_signature(app_secret: str, body: bytes, header: str | None) -> None:
    """Raise SignatureError unless the header is sha256=<hex HMAC-SHA256(app_secret, raw body)>."""
    check_signature_header(header)
    assert header is not None
    # Lower-case so an upper-case hex digest still matches; encode because compare_digest
    # refuses non-ASCII str, and a forged header must fail as a mismatch, not as a TypeError.
    candidate = header.removeprefix(_SIGNATURE_PREFIX).strip().lower().encode("utf-8", "replace")
    expected = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest().encode()
    if not hmac.compare_digest(candidate, expected):
        raise SignatureError("signature does not match")


def parse_envelope(body: Any) -> WaBatch:
    """Read a decoded webhook body; EnvelopeError if the envelope is wrong, per-item problems are kept."""
    root = _require_dict(body, "body")
    if root.get("object") != OBJECT:
        got = root.get("object")
        raise EnvelopeError(
            "object is missing" if got is None else f"object must be {OBJECT!r} (got {_describe(got)})"
        )
    batch = _Collector()
    for i, raw_entry in enumerate(_require_list(root, "entry", "entry")):
        entry = _require_dict(raw_entry, f"entry[{i}]")
        for j, raw_change in enumerate(_require_list(entry, "changes", f"entry[{i}].changes")):
            path = f"entry[{i}].changes[{j}]"
            change = _require_dict(raw_change, path)
            field = _require_str(change, "field", f"{path}.field")
            value = _require_dict(_require_key(change, "value", f"{path}.value"), f"{path}.value")
            # Other fields (account_update, templates, ...) are valid deliveries we do not act on.
            if field == "messages":
                batch.read_messages_value(value, f"{path}.value")
    return batch.result()


class _Collector:
    """Accumulates the items of one envelope, change by change."""

    def __init__(self) -> None:
        self.messages: list[WaMessage] = []
        self.statuses: list[WaStatus] = []
        self.errors: list[WaError] = []
        self.unparseable: list[WaUnparseable] = []
        self.seen: set[str] = set()

    def read_messages_value(self, value: dict[str, Any], path: str) -> None:
        if value.get("messaging_product") != "whatsapp":
            got = value.get("messaging_product")
            raise EnvelopeError(
                f"{path}.messaging_product is missing"
                if got is None
                else f"{path}.messaging_product must be 'whatsapp' (got {_describe(got)})"
            )
        metadata = _require_dict(_require_key(value, "metadata", f"{path}.metadata"), f"{path}.metadata")
        phone_number_id = _require_str(metadata, "phone_number_id", f"{path}.metadata.phone_number_id")
        self.seen.add(phone_number_id)
        raw_messages = _optional_list(value, "messages", f"{path}.messages")
        raw_statuses = _optional_list(value, "statuses", f"{path}.statuses")
        raw_errors = _optional_list(value, "errors", f"{path}.errors")
        profiles = _profiles(value.get("contacts"), raw_messages)
        for k, item in enumerate(raw_messages):
            try:
                self.messages.append(_message(phone_number_id, item, profiles))
            except _ItemError as exc:
                error = f"{path}.messages[{k}]: {exc}"
                self.unparseable.append(WaUnparseable(phone_number_id, "message", error, item))
        for k, item in enumerate(raw_statuses):
            try:
                self.statuses.append(_status(phone_number_id, item))
            except _ItemError as exc:
                error = f"{path}.statuses[{k}]: {exc}"
                self.unparseable.append(WaUnparseable(phone_number_id, "status", error, item))
        self.errors.extend(_error(phone_number_id, item) for item in raw_errors)

    def result(self) -> WaBatch:
        return WaBatch(
            messages=tuple(self.messages),
            statuses=tuple(self.statuses),
            errors=tuple(self.errors),
            unparseable=tuple(self.unparseable),
            seen_phone_number_ids=frozenset(self.seen),
        )


def _message(phone_number_id: str, item: object, profiles: dict[str, Any]) -> WaMessage:
    if not isinstance(item, dict):
        raise _ItemError(f"message must be an object (got {_describe(item)})")
    provider_message_id = _item_str(item, "id")
    contact_id = _item_str(item, "from")
    sent_at = _timestamp(item)
    kind = _item_str(item, "type")
    text, text_path = _text(kind, item)
    payload = _without(item, text_path)  # a copy: the caller's decoded body is never mutated
    profile = profiles.get(contact_id)
    if profile is not None:
        payload["contact_profile"] = profile
    return WaMessage(
        phone_number_id=phone_number_id,
        contact_id=contact_id,
        provider_message_id=provider_message_id,
        type=kind,
        text=text,
        payload=payload,
        sent_at=sent_at,
    )


def _status(phone_number_id: str, item: object) -> WaStatus:
    if not isinstance(item, dict):
        raise _ItemError(f"status must be an object (got {_describe(item)})")
    provider_message_id = _item_str(item, "id")
    recipient_id = _item_str(item, "recipient_id")
    status = _item_str(item, "status")
    at = _timestamp(item)
    raw_errors = item.get("errors")
    # Only objects are kept as errors; anything odd stays visible in the raw payload.
    errors = tuple(e for e in raw_errors if isinstance(e, dict)) if isinstance(raw_errors, list) else ()
    return WaStatus(
        phone_number_id=phone_number_id,
        recipient_id=recipient_id,
        provider_message_id=provider_message_id,
        status=status,
        at=at,
        errors=errors,
        payload=dict(item),
    )


def _error(phone_number_id: str, item: object) -> WaError:
    if not isinstance(item, dict):
        # Errors are reports, not data we act on: keep an odd one visible rather than fail the delivery.
        return WaError(phone_number_id, None, f"unreadable error item ({_describe(item)})", {"item": item})
    title = item.get("title") if isinstance(item.get("title"), str) else item.get("message")
    return WaError(
        phone_number_id=phone_number_id,
        code=_error_code(item.get("code")),
        title=title if isinstance(title, str) else "",
        payload=dict(item),
    )


def _error_code(raw: object) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    return None


def _profiles(contacts: object, messages: list[Any]) -> dict[str, Any]:
    """contacts[].profile keyed by the message "from" it belongs to."""
    # contacts only enrich messages, so a malformed array is ignored rather than failing the delivery.
    if not isinstance(contacts, list):
        return {}
    usable = [c for c in contacts if isinstance(c, dict) and "profile" in c]
    found = {c["wa_id"]: c["profile"] for c in usable if isinstance(c.get("wa_id"), str)}
    # Meta says a user's wa_id and "from" phone number may differ. When the change holds one
    # contact and one sender there is no doubt whose profile it is, so pair them anyway.
    senders = {m.get("from") for m in messages if isinstance(m, dict) and isinstance(m.get("from"), str)}
    if len(usable) == 1 and len(senders) == 1:
        found.setdefault(senders.pop(), usable[0]["profile"])
    return found


def _text(kind: str, message: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """(the human-readable part of a message or None, the path of the field it was copied from).

    The path is empty when the text is composed (location, contacts): those fields stay in the
    payload, and the record size check bounds what repeating them costs.
    """
    body = message.get(kind)
    obj = body if isinstance(body, dict) else {}
    if kind == "text" or kind == "system":
        return _copied(obj, kind, "body")
    if kind in _MEDIA_TYPES:
        return _copied(obj, kind, "caption")
    if kind == "interactive":
        sub = obj.get("type")
        reply = obj.get(sub) if isinstance(sub, str) else None
        return _copied(reply, kind, str(sub), "title") if isinstance(reply, dict) else (None, ())
    if kind == "button":
        return _copied(obj, kind, "text")
    if kind == "reaction":
        # A removed reaction arrives without "emoji".
        return _copied(obj, kind, "emoji")
    if kind == "location":
        return _location_text(obj), ()
    if kind == "contacts":
        return _contacts_text(body), ()
    return None, ()


def _copied(obj: dict[str, Any], *path: str) -> tuple[str | None, tuple[str, ...]]:
    value = _str_or_none(obj.get(path[-1]))
    return value, (path if value is not None else ())


def _without(item: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of item without the field at path (copying only the objects along the path)."""
    out = dict(item)
    node = out
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            return out
        copy = dict(child)
        node[key] = copy
        node = copy
    if path:
        node.pop(path[-1], None)
    return out


def _location_text(location: dict[str, Any]) -> str | None:
    named = [v for v in (location.get("name"), location.get("address")) if isinstance(v, str) and v]
    if named:
        return ", ".join(named)
    lat, long = location.get("latitude"), location.get("longitude")
    if _is_coordinate(lat) and _is_coordinate(long):
        return f"{lat},{long}"
    return None


def _contacts_text(contacts: object) -> str | None:
    if not isinstance(contacts, list):
        return None
    names = [
        c["name"]["formatted_name"]
        for c in contacts
        if isinstance(c, dict)
        and isinstance(c.get("name"), dict)
        and isinstance(c["name"].get("formatted_name"), str)
    ]
    return ", ".join(names) if names else None


def _is_coordinate(value: object) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool)


def _timestamp(item: dict[str, Any]) -> datetime | None:
    if "timestamp" not in item:
        raise _ItemError("timestamp is missing")
    raw = item["timestamp"]
    # Meta sends unix seconds as a string; ints are accepted too. Anything else is not a time.
    is_int = isinstance(raw, int) and not isinstance(raw, bool)
    if not is_int and not (isinstance(raw, str) and raw.isascii() and raw.isdigit()):
        raise _ItemError(f"timestamp must be unix seconds (got {_describe(raw)})")
    try:
        # int() refuses digit strings past sys.get_int_max_str_digits; both land here.
        return datetime.fromtimestamp(int(raw), UTC)
    except (OverflowError, OSError, ValueError):
        # A time, but not one a datetime holds: the caller falls back to the receipt time.
        return None


def _item_str(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if value is None:
        raise _ItemError(f"{key} is missing")
    if not isinstance(value, str) or not value:
        raise _ItemError(f"{key} must be a non-empty string (got {_describe(value)})")
    return value


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _require_key(obj: dict[str, Any], key: str, path: str) -> object:
    if obj.get(key) is None:
        raise EnvelopeError(f"{path} is missing")
    return obj[key]


def _require_dict(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EnvelopeError(f"{path} must be an object (got {_describe(value)})")
    return value


def _require_list(obj: dict[str, Any], key: str, path: str) -> list[Any]:
    value = _require_key(obj, key, path)
    if not isinstance(value, list):
        raise EnvelopeError(f"{path} must be a list (got {_describe(value)})")
    return value


def _optional_list(obj: dict[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise EnvelopeError(f"{path} must be a list (got {_describe(value)})")
    return value


def _require_str(obj: dict[str, Any], key: str, path: str) -> str:
    value = _require_key(obj, key, path)
    if not isinstance(value, str) or not value:
        raise EnvelopeError(f"{path} must be a non-empty string (got {_describe(value)})")
    return value


def _describe(value: object) -> str:
    """A short JSON-flavoured description of a value for error messages (never the whole value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else "a long string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
