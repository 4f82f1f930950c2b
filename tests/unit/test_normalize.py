"""Ingress limits and the input checks around them (pure: no HTTP, no Kafka, no Postgres)."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from api.admin import bearer_token, command_event_id
from api.webhooks import generic_event_id
from channels import normalize, twilio
from channels.config import CHANNEL_IN
from channels.signatures import SignatureError, standard_webhook_key
from channels.whatsapp import claimed_phone_number_ids
from streams.store import decode_cursor

NOW = datetime(2025, 6, 8, 12, 0, tzinfo=UTC)


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_is_bounded_at_the_limit() -> None:
    assert not normalize.too_deep(nested(normalize.MAX_NESTING))
    assert normalize.too_deep(nested(normalize.MAX_NESTING + 1))
    assert normalize.too_deep({"a": [{"b": nested(normalize.MAX_NESTING)}]})
    assert not normalize.too_deep("scalar") and not normalize.too_deep({})


def test_load_json_answers_400_and_422() -> None:
    with pytest.raises(normalize.IngressError) as bad:
        normalize.load_json(b"{nope")
    assert bad.value.status == 400
    with pytest.raises(normalize.IngressError) as deep:
        normalize.load_json(b"[" * 1000 + b"]" * 1000)  # orjson would accept ~1024 levels
    assert deep.value.status == 422
    assert normalize.load_json(b'{"a": [1]}') == {"a": [1]}


def test_nul_is_found_and_replaced_in_keys_and_values() -> None:
    body = {"a\x00": ["x", {"k": "v\x00\x00"}], "n": 1, "ok": "fine"}
    assert normalize.has_nul(body)
    scrubbed, count = normalize.scrub_nul(body)
    assert scrubbed == {"a\ufffd": ["x", {"k": "v\ufffd\ufffd"}], "n": 1, "ok": "fine"}
    assert count == 2
    assert body["a\x00"] == ["x", {"k": "v\x00\x00"}]  # the input is not mutated
    clean = {"a": ["b"]}
    assert not normalize.has_nul(clean) and normalize.scrub_nul(clean) == (clean, 0)


@pytest.mark.parametrize(
    ("at", "kept"),
    [
        (NOW, True),
        (NOW + timedelta(hours=23), True),
        (NOW + timedelta(days=2), False),
        (NOW - timedelta(days=365 * 9), True),
        (datetime(1970, 1, 1, tzinfo=UTC), False),
        (datetime(9999, 12, 31, tzinfo=UTC), False),
        (None, False),
    ],
)
def test_provider_times_outside_the_window_fall_back_to_receipt(at: datetime | None, kept: bool) -> None:
    assert normalize.provider_time(at, NOW) == ((at, False) if kept else (NOW, True))


def test_record_size_limit() -> None:
    normalize.check_record(b"k", b"v" * (normalize.MAX_RECORD_BYTES - 1), "x")
    with pytest.raises(normalize.IngressError) as big:
        normalize.check_record(b"k", b"v" * normalize.MAX_RECORD_BYTES, "message 'm1'")
    assert big.value.status == 413 and "message 'm1'" in str(big.value)


def test_standard_webhook_secrets_padded_or_not() -> None:
    key = bytes(range(32))
    padded = "whsec_" + base64.b64encode(key).decode()
    assert padded.endswith("=")
    assert standard_webhook_key(padded) == key
    assert standard_webhook_key(padded.rstrip("=")) == key
    for bad in ("whsec_" + "A" * 17, "whsec_AAAA=AAA", "whsec_-_-_-_-_", "whsec_"):
        with pytest.raises(ValueError):
            standard_webhook_key(bad)


@pytest.mark.parametrize(
    ("secret", "ok"),
    [
        ("whsec_" + base64.b64encode(b"k" * 24).decode(), True),
        ("whsec_" + base64.b64encode(b"k" * 32).decode().rstrip("="), True),
        ("whsec_" + "A" * 17, False),  # 17 base64 characters decode to nothing whole
        ("whsec_" + "A" * 15 + "=" + "A" * 4, False),
        ("whsec_" + "A" * 2000, False),
    ],
)
def test_generic_channel_registration_checks_the_secret_decodes(secret: str, ok: bool) -> None:
    body = {"id": "support", "provider": "generic", "secret": secret}
    if ok:
        CHANNEL_IN.validate_python(body)
    else:
        with pytest.raises(ValidationError):
            CHANNEL_IN.validate_python(body)


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode()


def test_cursor_round_trip_and_tampering() -> None:
    conv = str(uuid.uuid4())
    assert decode_cursor(_cursor(["2025-06-08T12:00:00+00:00", conv])) == (NOW, conv)
    tampered = [
        ["2025-06-08T12:00:00+00:00", "not-a-uuid"],
        ["2025-06-08T12:00:00", conv],  # no offset
        ["2025-06-08T12:00:00+00:00", conv, "extra"],
        [1, conv],
        ["2025-06-08T12:00:00+00:00", 7],
        {"a": 1},
        "x",
    ]
    for value in tampered:
        with pytest.raises(ValueError, match="cursor"):
            decode_cursor(_cursor(value))
    for raw in ("!!!", "", "e30"):
        with pytest.raises(ValueError, match="cursor"):
            decode_cursor(raw)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer s3cret", "s3cret"),
        ("bearer s3cret", "s3cret"),
        ("Bearer   s3cret  ", "s3cret"),
        ("s3cret", None),
        ("Basic s3cret", None),
        ("Bearer", None),
        ("Bearer a b", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_scheme_is_required(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_command_ids_derive_from_the_idempotency_key() -> None:
    conv = str(uuid.uuid4())
    first = command_event_id("close", conv, "retry-me")
    assert first == command_event_id("close", conv, "retry-me")
    assert first.startswith(f"cmd:close:{conv}:") and len(first.rsplit(":", 1)[1]) == 32
    assert first != command_event_id("accept", conv, "retry-me")
    assert first != command_event_id("close", str(uuid.uuid4()), "retry-me")
    assert command_event_id("close", conv, None) != command_event_id("close", conv, None)


def test_generic_event_ids_include_the_sender_unambiguously() -> None:
    assert generic_event_id("ch", "5511", "m1") != generic_event_id("ch", "5522", "m1")
    assert generic_event_id("ch", "a:b", "c") != generic_event_id("ch", "a", "b:c")


def test_twilio_signatures_over_the_url_with_or_without_its_port() -> None:
    token, params = "a" * 32, {"Body": "hi", "From": "+1555"}

    def signed(url: str) -> str:
        return twilio.expected_signature(token, url, params)

    plain = "https://parley.example.com/webhooks/twilio?ch=1"
    with_port = "https://parley.example.com:443/webhooks/twilio?ch=1"
    for configured, signed_as in [(plain, with_port), (with_port, plain), (plain, plain)]:
        twilio.verify_signature(token, configured, params, signed(signed_as))
    twilio.verify_signature(token, "http://h.example:8080/x", params, signed("http://h.example/x"))
    twilio.verify_signature(token, "http://h.example/x", params, signed("http://h.example:80/x"))
    for wrong in ["https://parley.example.com:8443/webhooks/twilio?ch=1", "http://parley.example.com/x"]:
        with pytest.raises(SignatureError):
            twilio.verify_signature(token, plain, params, signed(wrong))


def test_phone_number_ids_are_found_without_parsing() -> None:
    raw = (
        b'{"entry": [{"changes": [{"value": {"metadata": {"phone_number_id" : "123"}},'
        b' "x": {"phone_number_id":"456"}}]}], "text": {"body": "phone_number_id"}}'
    )
    assert claimed_phone_number_ids(raw) == {"123", "456"}
    assert claimed_phone_number_ids(b"not json at all") == set()
    many = b"".join(b'"phone_number_id": "%d",' % i for i in range(100))
    assert claimed_phone_number_ids(many) is None
