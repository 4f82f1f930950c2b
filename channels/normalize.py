"""Ingress limits: whatever the API answers 2xx for must be storable by the worker.

One place for every bound the HTTP ingress enforces before producing to Kafka, used by every
ingress route (generic, WhatsApp, Twilio, admin commands). Pure: the clock is a parameter.

- NUL: PostgreSQL `text` and `jsonb` cannot hold U+0000. Provider bodies (WhatsApp, Twilio) get
  it replaced by U+FFFD (and a log line): we cannot make Meta or Twilio send something else, and a
  4xx would only be retried for days and then lost. Bodies in our own schemas (the generic channel,
  admin commands) are refused with 422 instead: the sender can fix them, and silently rewriting an
  identifier could merge two distinct ids ("a\\x00" and "a\\ufffd").
- Nesting: orjson parses ~1024 levels, the worker decodes records with pydantic's JSON parser
  (recursion limit ~200, the record's own envelope included). Bodies deeper than MAX_NESTING are
  refused with 422, signed provider bodies too: the worker could never store them.
- Time: a provider's timestamp outside [receipt - MAX_PAST, receipt + MAX_FUTURE] falls back to
  the receipt time (year 9999 overflows `sent_at + 24h` in the worker; year 1970 is a clock bug,
  not a message). For the generic channel (our schema) it is a 422.
- Size: a Kafka record (key + value) above MAX_RECORD_BYTES is refused with 413 before producing:
  the broker's default max.message.bytes and the worker's producer stop near 1,000,000 bytes, and
  a size problem must never look like "Kafka unavailable" (503), which providers retry forever.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson

MAX_NESTING = 64  # containers (objects/arrays) from the body's root; the worker's limit is ~200
MAX_RECORD_BYTES = 900_000  # key + value of one produced record
MAX_FUTURE = timedelta(days=1)  # provider clocks drift, but not by more than a day
MAX_PAST = timedelta(days=3653)  # ten years: older is a broken clock (e.g. unix 0), not a message
REPLACEMENT = "\ufffd"


class IngressError(Exception):
    """The body cannot be accepted; `status` is the HTTP answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """True when objects/arrays nest more than `limit` levels (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def load_json(raw: bytes) -> Any:
    """Decode a JSON body: 400 when it is not JSON, 422 when it nests deeper than MAX_NESTING."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise IngressError(400, f"body is not valid JSON: {exc}") from exc
    if too_deep(value):
        raise IngressError(422, f"body nests deeper than {MAX_NESTING} levels")
    return value


def has_nul(value: Any) -> bool:
    """True when a string (or an object key) anywhere in a decoded body holds U+0000."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def scrub_nul(value: Any) -> tuple[Any, int]:
    """(value with U+0000 replaced by U+FFFD in every string and key, how many strings changed).

    Recursive: call it on bodies that passed `too_deep` (or flat forms) only.
    """
    if isinstance(value, str):
        return (value.replace("\x00", REPLACEMENT), 1) if "\x00" in value else (value, 0)
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        count = 0
        for key, item in value.items():
            new_key, n_key = scrub_nul(key)
            new_item, n_item = scrub_nul(item)
            out[new_key] = new_item
            count += n_key + n_item
        return (out, count) if count else (value, 0)
    if isinstance(value, list):
        items = [scrub_nul(item) for item in value]
        count = sum(n for _, n in items)
        return ([item for item, _ in items], count) if count else (value, 0)
    return value, 0


def in_window(at: datetime, now: datetime) -> bool:
    """Whether a sender's timestamp is plausible for something received at `now`."""
    return now - MAX_PAST <= at <= now + MAX_FUTURE


def provider_time(at: datetime | None, now: datetime) -> tuple[datetime, bool]:
    """(the time to keep, whether it fell back to `now`): a provider's out-of-window time is not kept."""
    if at is None or not in_window(at, now):
        return now, True
    return at, False


def check_record(key: bytes, value: bytes, what: str) -> None:
    """413 unless one record (key + value) fits under MAX_RECORD_BYTES."""
    size = len(key) + len(value)
    if size > MAX_RECORD_BYTES:
        raise IngressError(
            413, f"{what} would be a {size}-byte event, over the {MAX_RECORD_BYTES}-byte limit"
        )
