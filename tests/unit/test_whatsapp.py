"""Tests for channels.whatsapp: Meta Cloud API envelopes, per-item tolerance, signatures."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.signatures import SignatureError
from channels.whatsapp import (
    EnvelopeError,
    WaBatch,
    WaError,
    WaMessage,
    WaStatus,
    WaUnparseable,
    parse_envelope,
    sign,
    verify_signature,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "whatsapp"
PHONE_NUMBER_ID = "106540352242922"
USER = "16505551234"
SECRET = "a3f1c9e2b7d84f6a9c0e1d2b3a4f5e6d"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    assert doc.pop("_source"), f"{name} must say where its shape comes from"
    return doc


def only_message(name: str) -> WaMessage:
    batch = parse_envelope(load(name))
    assert batch.unparseable == ()
    assert batch.statuses == ()
    assert len(batch.messages) == 1
    return batch.messages[0]


def only_status(name: str) -> WaStatus:
    batch = parse_envelope(load(name))
    assert batch.unparseable == ()
    assert batch.messages == ()
    assert len(batch.statuses) == 1
    return batch.statuses[0]


def first_message(doc: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = doc["entry"][0]["changes"][0]["value"]["messages"][0]
    return message


def test_every_fixture_names_its_source() -> None:
    names = sorted(p.name for p in FIXTURES.glob("*.json"))
    assert len(names) >= 20
    for name in names:
        source = json.loads((FIXTURES / name).read_text()).get("_source")
        assert isinstance(source, str)
        assert "Meta" in source, name


@pytest.mark.parametrize(
    ("fixture", "kind", "text"),
    [
        ("text.json", "text", "Does it come in another color?"),
        ("image.json", "image", "Does this come in green?"),
        ("audio.json", "audio", None),
        ("video.json", "video", "Here it is in the shop window"),
        ("document.json", "document", "Lucky Shrub Invoice"),
        ("sticker.json", "sticker", None),
        ("location.json", "location", "Lucky Shrub, 101 Forest Ave, Palo Alto, CA 94301"),
        ("contacts.json", "contacts", "Barbara J. Johnson"),
        ("interactive_button_reply.json", "interactive", "Cancel"),
        ("interactive_list_reply.json", "interactive", "Priority Mail Express"),
        ("button.json", "button", "Unsubscribe"),
        ("reaction.json", "reaction", "\N{THUMBS UP SIGN}"),
        ("system.json", "system", "User Sheena Nelson changed from 16505551234 to 12195555358"),
        ("unsupported.json", "unsupported", None),
    ],
)
def test_each_message_type_parses(fixture: str, kind: str, text: str | None) -> None:
    raw = first_message(load(fixture))
    message = only_message(fixture)
    assert message.type == kind
    assert message.text == text
    assert message.phone_number_id == PHONE_NUMBER_ID
    assert message.contact_id == USER
    assert message.provider_message_id == raw["id"]
    assert message.sent_at == datetime.fromtimestamp(int(raw["timestamp"]), UTC)
    assert message.sent_at.tzinfo is UTC
    # The payload is the raw message as received without the field the text was read from (the
    # text is stored once), plus the sender's profile when Meta sent one.
    payload = {k: v for k, v in message.payload.items() if k != "contact_profile"}
    if text is None or kind in ("location", "contacts"):
        assert payload == raw
    else:
        # Exactly one field less, inside the type's object.
        assert payload.keys() == raw.keys() and payload[kind] != raw[kind]
        assert json.dumps(payload[kind]).count(":") == json.dumps(raw[kind]).count(":") - 1


def test_text_message_matches_metas_published_example() -> None:
    message = only_message("text.json")
    assert message == WaMessage(
        phone_number_id="106540352242922",
        contact_id="16505551234",
        provider_message_id="wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
        type="text",
        text="Does it come in another color?",
        payload={
            "from": "16505551234",
            "id": "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
            "timestamp": "1749416383",
            "type": "text",
            "text": {},  # the body is the message's text, stored once
            "contact_profile": {"name": "Sheena Nelson"},
        },
        sent_at=datetime(2025, 6, 8, 20, 59, 43, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("fixture", "kind", "mime_type"),
    [
        ("image.json", "image", "image/jpeg"),
        ("audio.json", "audio", "audio/ogg; codecs=opus"),
        ("video.json", "video", "video/mp4"),
        ("document.json", "document", "application/pdf"),
        ("sticker.json", "sticker", "image/webp"),
    ],
)
def test_media_ids_and_details_are_kept(fixture: str, kind: str, mime_type: str) -> None:
    raw = first_message(load(fixture))[kind]
    media = only_message(fixture).payload[kind]
    assert media["id"] == raw["id"]
    assert media["id"].isdigit()
    assert media["mime_type"] == mime_type
    assert media["sha256"] == raw["sha256"]


def test_media_extras_survive() -> None:
    assert only_message("audio.json").payload["audio"]["voice"] is True
    assert only_message("sticker.json").payload["sticker"]["animated"] is False
    assert only_message("document.json").payload["document"]["filename"] == "lucky-shrub-invoice.pdf"


def test_replies_keep_their_context_and_ids() -> None:
    context_id = "wamid.HBgLMTQxMjU1NTA4MjkVAgASGBQzQUNCNjk5RDUwNUZGMUZEM0VBRAA="
    button = only_message("interactive_button_reply.json").payload
    assert button["interactive"]["button_reply"]["id"] == "cancel-button"
    assert button["context"]["id"] == context_id
    row = only_message("interactive_list_reply.json").payload
    assert row["interactive"]["list_reply"]["id"] == "priority_express"
    assert row["interactive"]["list_reply"]["description"] == "Next Day to 2 Days"
    quick = only_message("button.json").payload
    assert quick["button"]["payload"] == "Unsubscribe"
    assert quick["context"]["id"] == context_id


def test_unsupported_message_keeps_its_errors() -> None:
    message = only_message("unsupported.json")
    assert message.payload["errors"][0]["code"] == 131051
    assert message.payload["unsupported"] == {"type": "poll_update"}


def test_system_message_has_no_profile_because_meta_sends_no_contacts() -> None:
    message = only_message("system.json")
    assert "contact_profile" not in message.payload
    assert message.payload["system"]["wa_id"] == "12195555358"


def test_contact_profile_is_attached() -> None:
    assert only_message("image.json").payload["contact_profile"] == {"name": "Sheena Nelson"}


def test_profile_pairs_a_single_contact_whose_wa_id_differs_from_the_phone_number() -> None:
    # Meta documents that a user's wa_id and "from" number may differ (e.g. Brazilian numbers).
    doc = load("text.json")
    doc["entry"][0]["changes"][0]["value"]["contacts"][0]["wa_id"] = "5511987654321"
    assert only_message_of(doc).payload["contact_profile"] == {"name": "Sheena Nelson"}


def only_message_of(doc: dict[str, Any]) -> WaMessage:
    batch = parse_envelope(doc)
    assert len(batch.messages) == 1
    return batch.messages[0]


def test_location_without_name_or_address_reads_as_coordinates() -> None:
    doc = load("location.json")
    location = first_message(doc)["location"]
    del location["name"], location["address"]
    assert only_message_of(doc).text == "37.44221496582,-122.16151428223"


def test_removed_reaction_has_no_text() -> None:
    doc = load("reaction.json")
    del first_message(doc)["reaction"]["emoji"]
    message = only_message_of(doc)
    assert message.type == "reaction"
    assert message.text is None


def test_unknown_message_type_is_kept_as_given() -> None:
    doc = load("text.json")
    message = first_message(doc)
    message["type"] = "hologram"
    message["hologram"] = {"depth": 3}
    parsed = only_message_of(doc)
    assert parsed.type == "hologram"
    assert parsed.text is None
    assert parsed.payload["hologram"] == {"depth": 3}


def test_integer_timestamp_is_accepted() -> None:
    doc = load("text.json")
    first_message(doc)["timestamp"] = 1749416383
    assert only_message_of(doc).sent_at == datetime(2025, 6, 8, 20, 59, 43, tzinfo=UTC)


def test_parsing_does_not_mutate_the_body() -> None:
    doc = load("batch_mixed.json")
    before = copy.deepcopy(doc)
    parse_envelope(doc)
    assert doc == before


@pytest.mark.parametrize(
    ("fixture", "status"),
    [
        ("status_sent.json", "sent"),
        ("status_delivered.json", "delivered"),
        ("status_read.json", "read"),
        ("status_failed.json", "failed"),
    ],
)
def test_each_status_parses(fixture: str, status: str) -> None:
    raw = load(fixture)["entry"][0]["changes"][0]["value"]["statuses"][0]
    parsed = only_status(fixture)
    assert parsed.status == status
    assert parsed.phone_number_id == PHONE_NUMBER_ID
    assert parsed.recipient_id == USER
    assert parsed.provider_message_id == "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBIzRkM4MjI0NTdGMzI0NjE1OTIA"
    assert parsed.at == datetime.fromtimestamp(int(raw["timestamp"]), UTC)
    assert parsed.payload == raw


def test_conversation_and_pricing_stay_in_the_status_payload() -> None:
    sent = only_status("status_sent.json")
    assert sent.errors == ()
    assert sent.payload["conversation"]["origin"] == {"type": "utility"}
    assert sent.payload["pricing"]["billable"] is True
    assert "conversation" not in only_status("status_read.json").payload


def test_failed_status_keeps_its_errors() -> None:
    failed = only_status("status_failed.json")
    assert len(failed.errors) == 1
    assert failed.errors[0]["code"] == 131049
    assert failed.errors[0]["error_data"]["details"].startswith("In order to maintain")


def test_unknown_status_value_is_kept() -> None:
    doc = load("status_read.json")
    doc["entry"][0]["changes"][0]["value"]["statuses"][0]["status"] = "played"
    batch = parse_envelope(doc)
    assert [s.status for s in batch.statuses] == ["played"]


def test_value_level_errors() -> None:
    batch = parse_envelope(load("errors.json"))
    assert batch.messages == () and batch.statuses == () and batch.unparseable == ()
    assert len(batch.errors) == 1
    error = batch.errors[0]
    assert error.phone_number_id == PHONE_NUMBER_ID
    assert error.code == 130429
    assert error.title == "Rate limit hit"
    assert error.payload["error_data"]["details"].startswith("Message failed to send")
    assert batch.phone_number_ids() == {PHONE_NUMBER_ID}


def test_mixed_batch_yields_every_item_and_ignores_other_fields() -> None:
    batch = parse_envelope(load("batch_mixed.json"))
    assert batch.unparseable == ()
    assert [(m.provider_message_id, m.type, m.contact_id, m.phone_number_id) for m in batch.messages] == [
        ("wamid.BATCH.M1", "text", USER, PHONE_NUMBER_ID),
        ("wamid.BATCH.M2", "image", "16315551234", PHONE_NUMBER_ID),
        ("wamid.BATCH.M3", "text", "60173526233", "114896151713920"),
    ]
    # Two contacts in one change: each message gets its own sender's profile.
    assert batch.messages[0].payload["contact_profile"] == {"name": "Sheena Nelson"}
    assert batch.messages[1].payload["contact_profile"] == {"name": "Kerry Fisher"}
    assert "contact_profile" not in batch.messages[2].payload
    assert [(s.provider_message_id, s.status, len(s.errors)) for s in batch.statuses] == [
        ("wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBIzRkM4MjI0NTdGMzI0NjE1OTIA", "sent", 0),
        ("wamid.BATCH.S2", "delivered", 0),
        ("wamid.BATCH.S3", "failed", 1),
    ]
    assert batch.statuses[2].errors[0]["code"] == 131026
    assert [(e.phone_number_id, e.code) for e in batch.errors] == [("114896151713920", 130429)]
    assert batch.phone_number_ids() == {PHONE_NUMBER_ID, "114896151713920"}


def test_only_other_fields_is_an_empty_batch() -> None:
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [{"field": "account_update", "value": {"event": "VERIFIED_ACCOUNT"}}],
            }
        ],
    }
    assert parse_envelope(body) == WaBatch((), (), (), ())


def test_phone_number_id_of_an_empty_messages_change_is_seen() -> None:
    doc = load("status_read.json")
    del doc["entry"][0]["changes"][0]["value"]["statuses"]
    batch = parse_envelope(doc)
    assert batch.statuses == ()
    assert batch.phone_number_ids() == {PHONE_NUMBER_ID}


def test_phone_number_ids_of_a_hand_built_batch() -> None:
    error = WaError("111", 1, "t", {})
    broken = WaUnparseable("222", "status", "id is missing", {})
    assert WaBatch((), (), (error,), (broken,)).phone_number_ids() == {"111", "222"}


def test_unknown_extra_fields_are_accepted_everywhere() -> None:
    doc = load("text.json")
    doc["brand_new_top_level"] = {"x": 1}
    doc["entry"][0]["time"] = 1749416390
    change = doc["entry"][0]["changes"][0]
    change["extra"] = [1, 2]
    value = change["value"]
    value["metadata"]["region"] = "EU"
    value["contacts"][0]["user_id"] = "US.13491208655302741918"
    message = value["messages"][0]
    message["identity"] = {"acknowledged": True, "hash": "Sjvjlx8G6Z0="}
    message["text"]["mentions"] = []
    parsed = only_message_of(doc)
    assert parsed.text == "Does it come in another color?"
    assert parsed.payload["identity"]["hash"] == "Sjvjlx8G6Z0="


def _envelope_with(mutate: str) -> Any:
    doc: Any = load("text.json")
    change = doc["entry"][0]["changes"][0]
    match mutate:
        case "not a dict":
            return [doc]
        case "no object":
            del doc["object"]
        case "wrong object":
            doc["object"] = "page"
        case "no entry":
            del doc["entry"]
        case "entry not a list":
            doc["entry"] = doc["entry"][0]
        case "entry item not a dict":
            doc["entry"] = ["x"]
        case "changes not a list":
            doc["entry"][0]["changes"] = {"0": change}
        case "change without value":
            del change["value"]
        case "value not a dict":
            change["value"] = "v"
        case "change without field":
            del change["field"]
        case "field not a string":
            change["field"] = 7
        case "no metadata":
            del change["value"]["metadata"]
        case "missing phone_number_id":
            del change["value"]["metadata"]["phone_number_id"]
        case "phone_number_id not a string":
            change["value"]["metadata"]["phone_number_id"] = 106540352242922
        case "no messaging_product":
            del change["value"]["messaging_product"]
        case "messaging_product not whatsapp":
            change["value"]["messaging_product"] = "instagram"
        case "messages not a list":
            change["value"]["messages"] = change["value"]["messages"][0]
        case "statuses not a list":
            change["value"]["statuses"] = {}
        case "second change broken":
            doc["entry"][0]["changes"].append(
                {"field": "messages", "value": {"messaging_product": "whatsapp"}}
            )
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("not a dict", "body must be an object (got list)"),
        ("no object", "object is missing"),
        ("wrong object", "object must be 'whatsapp_business_account' (got 'page')"),
        ("no entry", "entry is missing"),
        ("entry not a list", "entry must be a list (got object)"),
        ("entry item not a dict", "entry[0] must be an object (got 'x')"),
        ("changes not a list", "entry[0].changes must be a list (got object)"),
        ("change without value", "entry[0].changes[0].value is missing"),
        ("value not a dict", "entry[0].changes[0].value must be an object (got 'v')"),
        ("change without field", "entry[0].changes[0].field is missing"),
        ("field not a string", "entry[0].changes[0].field must be a non-empty string (got number)"),
        ("no metadata", "entry[0].changes[0].value.metadata is missing"),
        ("missing phone_number_id", "entry[0].changes[0].value.metadata.phone_number_id is missing"),
        (
            "phone_number_id not a string",
            "entry[0].changes[0].value.metadata.phone_number_id must be a non-empty string (got number)",
        ),
        ("no messaging_product", "entry[0].changes[0].value.messaging_product is missing"),
        (
            "messaging_product not whatsapp",
            "entry[0].changes[0].value.messaging_product must be 'whatsapp' (got 'instagram')",
        ),
        ("messages not a list", "entry[0].changes[0].value.messages must be a list (got object)"),
        ("statuses not a list", "entry[0].changes[0].value.statuses must be a list (got object)"),
        ("second change broken", "entry[0].changes[1].value.metadata is missing"),
    ],
)
def test_wrong_envelopes_name_the_path(mutate: str, message: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(_envelope_with(mutate))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (lambda m: m.pop("id"), "id is missing"),
        (lambda m: m.pop("from"), "from is missing"),
        (lambda m: m.pop("timestamp"), "timestamp is missing"),
        (lambda m: m.pop("type"), "type is missing"),
        (lambda m: m.update(id=""), "id must be a non-empty string (got '')"),
        (lambda m: m.update(timestamp="2025-06-08T20:59:43Z"), "timestamp must be unix seconds"),
        (lambda m: m.update(timestamp="-5"), "timestamp must be unix seconds (got '-5')"),
        (lambda m: m.update(timestamp=True), "timestamp must be unix seconds (got bool)"),
        (lambda m: m.update(timestamp=1.5), "timestamp must be unix seconds (got number)"),
    ],
)
def test_a_broken_message_is_unparseable_while_its_sibling_parses(
    breakage: Callable[[dict[str, Any]], object], error: str
) -> None:
    doc = load("text.json")
    messages = doc["entry"][0]["changes"][0]["value"]["messages"]
    sibling = copy.deepcopy(messages[0])
    sibling["id"] = "wamid.SIBLING"
    messages.append(sibling)
    breakage(messages[0])
    batch = parse_envelope(doc)
    assert [m.provider_message_id for m in batch.messages] == ["wamid.SIBLING"]
    assert len(batch.unparseable) == 1
    broken = batch.unparseable[0]
    assert broken.kind == "message"
    assert broken.phone_number_id == PHONE_NUMBER_ID
    assert broken.item is messages[0]
    assert broken.error.startswith(f"entry[0].changes[0].value.messages[0]: {error}")


@pytest.mark.parametrize("timestamp", ["9" * 30, "9" * 5000, str(10**12)])
def test_a_timestamp_past_datetimes_range_is_left_to_the_caller(timestamp: str) -> None:
    # Not a reason to park the message: the route falls back to the time it received it.
    doc = load("text.json")
    doc["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = timestamp
    batch = parse_envelope(doc)
    assert batch.unparseable == ()
    assert [m.sent_at for m in batch.messages] == [None]


def test_a_message_that_is_not_an_object_is_unparseable() -> None:
    doc = load("text.json")
    doc["entry"][0]["changes"][0]["value"]["messages"].insert(0, "hello")
    batch = parse_envelope(doc)
    assert len(batch.messages) == 1
    assert batch.unparseable == (
        WaUnparseable(
            PHONE_NUMBER_ID,
            "message",
            "entry[0].changes[0].value.messages[0]: message must be an object (got 'hello')",
            "hello",
        ),
    )


@pytest.mark.parametrize("key", ["id", "recipient_id", "status", "timestamp"])
def test_a_broken_status_is_unparseable_while_its_sibling_parses(key: str) -> None:
    doc = load("status_sent.json")
    statuses = doc["entry"][0]["changes"][0]["value"]["statuses"]
    sibling = copy.deepcopy(statuses[0])
    sibling["status"] = "delivered"
    statuses.append(sibling)
    del statuses[0][key]
    batch = parse_envelope(doc)
    assert [s.status for s in batch.statuses] == ["delivered"]
    assert len(batch.unparseable) == 1
    assert batch.unparseable[0].kind == "status"
    assert batch.unparseable[0].error == f"entry[0].changes[0].value.statuses[0]: {key} is missing"


def test_odd_error_items_are_kept_not_fatal() -> None:
    doc = load("errors.json")
    value = doc["entry"][0]["changes"][0]["value"]
    value["errors"].append("boom")
    value["errors"].append({"code": "131000", "message": "Something went wrong"})
    value["errors"].append({"code": "\N{SUPERSCRIPT TWO}", "title": 5})
    errors = parse_envelope(doc).errors
    assert [(e.code, e.title) for e in errors] == [
        (130429, "Rate limit hit"),
        (None, "unreadable error item ('boom')"),
        (131000, "Something went wrong"),
        (None, ""),
    ]


def test_sign_round_trip() -> None:
    body = (FIXTURES / "text.json").read_bytes()
    header = sign(SECRET, body)
    assert header.startswith("sha256=")
    assert len(header) == len("sha256=") + 64
    verify_signature(SECRET, body, header)
    verify_signature(SECRET, body, header.upper().replace("SHA256=", "sha256="))


def test_sign_matches_an_independent_hmac() -> None:
    # HMAC_SHA256("key", "The quick brown fox jumps over the lazy dog"), the example value
    # Wikipedia's HMAC article lists: catches a wrong algorithm or key/message swap.
    expected = "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert sign("key", b"The quick brown fox jumps over the lazy dog") == expected


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing X-Hub-Signature-256 header"),
        ("", "missing X-Hub-Signature-256 header"),
        ("sha1=abc", "X-Hub-Signature-256 must start with sha256="),
        (
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8",
            "X-Hub-Signature-256 must start",
        ),
        ("sha256=", "must be sha256= and 64 hex digits"),
        ("sha256=00", "must be sha256= and 64 hex digits"),
        ("sha256=" + "0" * 64, "signature does not match"),
        ("sha256=ünïcode", "must be sha256= and 64 hex digits"),
    ],
)
def test_bad_signature_headers(header: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify_signature(SECRET, b"{}", header)


def test_wrong_secret_or_body_does_not_match() -> None:
    body = (FIXTURES / "text.json").read_bytes()
    header = sign(SECRET, body)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_signature(SECRET + "x", body, header)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_signature(SECRET, body + b" ", header)


@settings(database=None)
@given(secret=st.text(max_size=64), body=st.binary(max_size=2048))
def test_signed_bodies_always_verify(secret: str, body: bytes) -> None:
    verify_signature(secret, body, sign(secret, body))


@settings(database=None)
@given(
    secret=st.text(max_size=64),
    body=st.binary(min_size=1, max_size=2048),
    where=st.integers(min_value=0),
    delta=st.integers(min_value=1, max_value=255),
)
def test_a_one_byte_change_never_verifies(secret: str, body: bytes, where: int, delta: int) -> None:
    header = sign(secret, body)
    i = where % len(body)
    tampered = body[:i] + bytes([(body[i] + delta) % 256]) + body[i + 1 :]
    assert tampered != body
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_signature(secret, tampered, header)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
MESSAGE_KEYS = st.sampled_from(
    [
        *("id", "from", "timestamp", "type", "text", "image", "interactive", "location", "contacts"),
        *("reaction", "button", "system", "context", "errors", "unsupported", "document", "sticker"),
    ]
)
STATUS_KEYS = st.sampled_from(
    ["id", "recipient_id", "status", "timestamp", "errors", "conversation", "pricing"]
)
ITEM_VALUES = st.one_of(
    st.sampled_from(["text", "image", "interactive", "location", "contacts", "1749416383", "x", ""]),
    JSON,
    st.fixed_dictionaries({}, optional={"body": JSON, "caption": JSON, "type": JSON, "title": JSON}),
)


@settings(database=None)
@given(
    messages=st.lists(st.one_of(JSON, st.dictionaries(MESSAGE_KEYS, ITEM_VALUES)), max_size=4),
    statuses=st.lists(st.one_of(JSON, st.dictionaries(STATUS_KEYS, ITEM_VALUES)), max_size=4),
    errors=st.lists(
        st.one_of(JSON, st.fixed_dictionaries({}, optional={"code": st.text() | JSON, "title": JSON})),
        max_size=2,
    ),
    contacts=JSON,
)
def test_any_items_in_a_valid_envelope_are_parsed_or_kept(
    messages: list[Any], statuses: list[Any], errors: list[Any], contacts: Any
) -> None:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": PHONE_NUMBER_ID},
        "messages": messages,
        "statuses": statuses,
        "errors": errors,
        "contacts": contacts,
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": value}]}],
    }
    batch = parse_envelope(body)
    broken = [u.kind for u in batch.unparseable]
    assert len(batch.messages) + broken.count("message") == len(messages)
    assert len(batch.statuses) + broken.count("status") == len(statuses)
    assert len(batch.errors) == len(errors)
    assert all(m.text is None or isinstance(m.text, str) for m in batch.messages)
