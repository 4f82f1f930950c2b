"""Tests for channels.outbound: content model, provider requests, answer classification, backoff."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from channels import twilio as twilio_inbound
from channels.outbound import (
    OUTBOUND_CONTENT,
    AudioContent,
    DocumentContent,
    ImageContent,
    OutboundContent,
    OutcomeKind,
    ProviderRequest,
    SendOutcome,
    TemplateContent,
    TextContent,
    Unsupported,
    VideoContent,
    backoff,
    classify_twilio,
    classify_whatsapp,
    contact_for,
    ensure_supported,
    is_free_form,
    next_wait,
    twilio_request,
    twilio_status_callback,
    whatsapp_request,
)

GRAPH = "https://graph.facebook.com"
PHONE_NUMBER_ID = "106540352242922"
TOKEN = "EAAJBtesttoken123"
USER = "16505551234"
MESSAGE_ID = "msg_01HZX3Q5"
TWILIO = "https://api.twilio.com"
ACCOUNT = "AC3f9a1c0b7d2e4f6a8b9c0d1e2f3a4b5c"
AUTH_TOKEN = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
SANDBOX = "whatsapp:+14155238886"
TW_USER = "whatsapp:+14017122661"
CALLBACK = "https://parley.example.com/webhooks/twilio?parley_message_id=msg_01HZX3Q5"
CONTENT_SID = "HXb5b62575e6e4ff6129ad7c8efe1f983e"
LINK = "https://cdn.example.com/files/invoice-42.pdf"


def content(raw: dict[str, Any]) -> OutboundContent:
    return OUTBOUND_CONTENT.validate_python(raw)


def refusal(raw: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """(loc, type) of every error the content model reports for raw."""
    with pytest.raises(ValidationError) as info:
        OUTBOUND_CONTENT.validate_python(raw)
    return [(tuple(e["loc"]), e["type"]) for e in info.value.errors()]


# --- content ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "model"),
    [
        ({"type": "text", "text": "Hello"}, TextContent),
        ({"type": "image", "link": "https://cdn.example.com/a.jpg", "caption": "A"}, ImageContent),
        ({"type": "document", "link": LINK, "filename": "invoice-42.pdf"}, DocumentContent),
        ({"type": "audio", "link": "https://cdn.example.com/a.ogg"}, AudioContent),
        ({"type": "video", "link": "https://cdn.example.com/a.mp4"}, VideoContent),
        ({"type": "template", "name": "order_update", "language": "pt_BR"}, TemplateContent),
    ],
)
def test_each_content_type_is_accepted(raw: dict[str, Any], model: type) -> None:
    parsed = content(raw)
    assert isinstance(parsed, model)
    assert parsed.type == raw["type"]


def test_json_body_parses_like_python() -> None:
    raw = b'{"type": "template", "name": "hello_world", "language": "en_US", "components": []}'
    assert OUTBOUND_CONTENT.validate_json(raw) == TemplateContent(
        type="template", name="hello_world", language="en_US"
    )


def test_free_form_is_everything_but_templates() -> None:
    assert is_free_form(content({"type": "text", "text": "hi"}))
    assert is_free_form(content({"type": "audio", "link": LINK}))
    assert not is_free_form(content({"type": "template", "name": "hello_world", "language": "en"}))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"type": "sticker", "link": LINK}, [((), "union_tag_invalid")]),
        ({"text": "no type"}, [((), "union_tag_not_found")]),
        ({"type": "audio", "link": LINK, "caption": "hi"}, [(("audio", "caption"), "extra_forbidden")]),
        ({"type": "image", "link": LINK, "filename": "a.jpg"}, [(("image", "filename"), "extra_forbidden")]),
        ({"type": "image", "link": "http://cdn.example.com/a.jpg"}, [(("image", "link"), "value_error")]),
        ({"type": "video", "link": "https:///no-host"}, [(("video", "link"), "value_error")]),
        ({"type": "image", "link": "https://cdn.example.com/a b.jpg"}, [(("image", "link"), "value_error")]),
        (
            {"type": "image", "link": "https://x.example/" + "a" * 2000},
            [(("image", "link"), "string_too_long")],
        ),
        ({"type": "image"}, [(("image", "link"), "missing")]),
        ({"type": "text", "text": ""}, [(("text", "text"), "string_too_short")]),
        ({"type": "text", "text": "x" * 4097}, [(("text", "text"), "string_too_long")]),
        ({"type": "text", "text": 42}, [(("text", "text"), "string_type")]),
        ({"type": "text", "text": "hi", "to": "+1555"}, [(("text", "to"), "extra_forbidden")]),
        ({"type": "image", "link": LINK, "caption": "c" * 1025}, [(("image", "caption"), "string_too_long")]),
        (
            {"type": "template", "name": "order update", "language": "en_US"},
            [(("template", "name"), "string_pattern_mismatch")],
        ),
        (
            {"type": "template", "name": "Order_Update", "language": "en_US"},
            [(("template", "name"), "string_pattern_mismatch")],
        ),
        (
            {"type": "template", "name": "hello_world", "language": "en-US"},
            [(("template", "language"), "string_pattern_mismatch")],
        ),
        (
            {"type": "template", "name": "hello_world", "language": "en", "components": [{}] * 21},
            [(("template", "components"), "too_long")],
        ),
        (
            {"type": "template", "name": "hello_world", "language": "en", "components": ["body"]},
            [(("template", "components", 0), "dict_type")],
        ),
    ],
)
def test_bad_content_is_refused_naming_the_field(
    raw: dict[str, Any], expected: list[tuple[tuple[str | int, ...], str]]
) -> None:
    assert refusal(raw) == expected


def test_limits_are_inclusive() -> None:
    assert content({"type": "text", "text": "x" * 4096})
    assert content({"type": "image", "link": LINK, "caption": "c" * 1024})
    assert content({"type": "template", "name": "a" * 512, "language": "fil"})
    assert content({"type": "template", "name": "t", "language": "en", "components": [{}] * 20})
    assert refusal({"type": "template", "name": "a" * 513, "language": "en"}) == [
        (("template", "name"), "string_too_long")
    ]


def test_a_content_sid_is_a_valid_template_name() -> None:
    assert content({"type": "template", "name": CONTENT_SID, "language": "en"})


# --- WhatsApp request ------------------------------------------------------------------------


def wa(item: OutboundContent | dict[str, Any], **overrides: str) -> ProviderRequest:
    args = {
        "graph_base": GRAPH,
        "version": "v21.0",
        "phone_number_id": PHONE_NUMBER_ID,
        "access_token": TOKEN,
        "to": USER,
        "message_id": MESSAGE_ID,
    } | overrides
    parsed = content(item) if isinstance(item, dict) else item
    return whatsapp_request(content=parsed, **args)


def wa_body(item: dict[str, Any]) -> dict[str, Any]:
    request = wa(item)
    assert request.url == f"{GRAPH}/v21.0/{PHONE_NUMBER_ID}/messages"
    assert request.headers == {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body: dict[str, Any] = json.loads(request.body)
    envelope = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": USER,
        "type": item["type"],
        "biz_opaque_callback_data": MESSAGE_ID,
    }
    assert {k: v for k, v in body.items() if k != item["type"]} == envelope
    assert set(body) == {*envelope, item["type"]}
    inner: dict[str, Any] = body[item["type"]]
    return inner


def test_whatsapp_text() -> None:
    assert wa_body({"type": "text", "text": "Olá, tudo bem? 👋"}) == {
        "body": "Olá, tudo bem? 👋",
        "preview_url": False,
    }


def test_whatsapp_media() -> None:
    image = {"type": "image", "link": "https://cdn.example.com/a.jpg", "caption": "Your order"}
    assert wa_body(image) == {"link": "https://cdn.example.com/a.jpg", "caption": "Your order"}
    assert wa_body({"type": "image", "link": LINK}) == {"link": LINK}
    document = {"type": "document", "link": LINK, "caption": "Invoice", "filename": "invoice-42.pdf"}
    assert wa_body(document) == {"link": LINK, "caption": "Invoice", "filename": "invoice-42.pdf"}
    assert wa_body({"type": "audio", "link": LINK}) == {"link": LINK}
    video = {"type": "video", "link": "https://cdn.example.com/v.mp4", "caption": "Demo"}
    assert wa_body(video) == {"link": "https://cdn.example.com/v.mp4", "caption": "Demo"}


def test_whatsapp_template_passes_components_through() -> None:
    components = [
        {"type": "header", "parameters": [{"type": "image", "image": {"link": "https://x.example/h.png"}}]},
        {"type": "body", "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "#42"}]},
        {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "42"}]},
    ]
    item = {"type": "template", "name": "order_update", "language": "pt_BR", "components": components}
    assert wa_body(item) == {"name": "order_update", "language": {"code": "pt_BR"}, "components": components}
    assert wa_body({"type": "template", "name": "hello_world", "language": "en_US"}) == {
        "name": "hello_world",
        "language": {"code": "en_US"},
    }


def test_whatsapp_base_url_may_end_with_a_slash() -> None:
    request = wa({"type": "text", "text": "hi"}, graph_base="http://127.0.0.1:8081/")
    assert request.url == f"http://127.0.0.1:8081/v21.0/{PHONE_NUMBER_ID}/messages"


def test_whatsapp_refuses_a_content_sid_as_template() -> None:
    item = content({"type": "template", "name": CONTENT_SID, "language": "en"})
    with pytest.raises(Unsupported, match="Content SID"):
        wa(item)
    with pytest.raises(Unsupported):
        ensure_supported("whatsapp", item)
    ensure_supported("twilio", item)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"version": "21.0"}, "version"),
        ({"phone_number_id": "12/../34"}, "phone_number_id"),
        ({"access_token": ""}, "access_token"),
        ({"access_token": "a\r\nX-Evil: 1"}, "access_token"),
        ({"graph_base": "graph.facebook.com"}, "graph_base"),
        ({"to": ""}, "to"),
        ({"message_id": "x" * 513}, "512"),
        ({"message_id": "a\nb"}, "message_id"),
    ],
)
def test_whatsapp_refuses_bad_arguments(overrides: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        wa({"type": "text", "text": "hi"}, **overrides)


def test_repr_leaves_the_credentials_out() -> None:
    request = wa({"type": "text", "text": "hi"})
    assert TOKEN not in repr(request)
    assert request.url in repr(request)


# --- Twilio request --------------------------------------------------------------------------


def tw(item: OutboundContent | dict[str, Any], **overrides: str) -> ProviderRequest:
    args = {
        "api_base": TWILIO,
        "account_sid": ACCOUNT,
        "auth_token": AUTH_TOKEN,
        "sender": SANDBOX,
        "to": TW_USER,
        "message_id": MESSAGE_ID,
        "status_callback": CALLBACK,
    } | overrides
    parsed = content(item) if isinstance(item, dict) else item
    return twilio_request(content=parsed, **args)


def tw_form(item: dict[str, Any]) -> list[tuple[str, str]]:
    request = tw(item)
    assert request.url == f"{TWILIO}/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    basic = base64.b64encode(f"{ACCOUNT}:{AUTH_TOKEN}".encode()).decode()
    assert request.headers == {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    form = parse_qsl(request.body.decode(), keep_blank_values=True, strict_parsing=True)
    assert form[:2] == [("To", TW_USER), ("From", SANDBOX)]
    assert form[-1] == ("StatusCallback", CALLBACK)
    return form[2:-1]


def test_twilio_to_goes_in_the_senders_channel() -> None:
    """A Twilio WhatsApp contact is stored without "whatsapp:" (channels/twilio.py); Twilio refuses
    a whatsapp: From with a plain To (21910), so the request puts To in the sender's channel."""
    text = {"type": "text", "text": "oi"}

    def pair(**overrides: str) -> list[tuple[str, str]]:
        return parse_qsl(tw(text, **overrides).body.decode())[:2]

    assert pair(to="+14017122661") == [("To", TW_USER), ("From", SANDBOX)]
    assert pair(to=TW_USER) == [("To", TW_USER), ("From", SANDBOX)]
    assert pair(to="+14017122661", sender="+14155238886") == [
        ("To", "+14017122661"),
        ("From", "+14155238886"),
    ]


def test_twilio_text() -> None:
    assert tw_form({"type": "text", "text": "Olá & até já = 👋"}) == [("Body", "Olá & até já = 👋")]


def test_twilio_media() -> None:
    image = {"type": "image", "link": "https://cdn.example.com/a.jpg?sig=1&x=2", "caption": "Your order"}
    assert tw_form(image) == [("Body", "Your order"), ("MediaUrl", "https://cdn.example.com/a.jpg?sig=1&x=2")]
    assert tw_form({"type": "audio", "link": LINK}) == [("MediaUrl", LINK)]
    # Twilio sets no filename on WhatsApp documents: it is not sent.
    document = {"type": "document", "link": LINK, "filename": "invoice-42.pdf"}
    assert tw_form(document) == [("MediaUrl", LINK)]


def test_twilio_template_by_content_sid() -> None:
    components = [
        {"type": "body", "parameters": [{"type": "text", "text": "Ana"}, {"type": "text", "text": "#42"}]},
        {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "42"}]},
    ]
    item = {"type": "template", "name": CONTENT_SID, "language": "en", "components": components}
    form = dict(tw_form(item))
    assert form.keys() == {"ContentSid", "ContentVariables"}
    assert form["ContentSid"] == CONTENT_SID
    assert json.loads(form["ContentVariables"]) == {"1": "Ana", "2": "#42", "3": "42"}
    assert tw_form({"type": "template", "name": CONTENT_SID, "language": "en"}) == [
        ("ContentSid", CONTENT_SID)
    ]


def test_twilio_named_template_parameters_keep_their_names() -> None:
    params = [{"type": "text", "parameter_name": "first_name", "text": "Ana"}, {"type": "text", "text": "x"}]
    item = {"type": "template", "name": CONTENT_SID, "language": "en", "components": [{"parameters": params}]}
    form = dict(tw_form(item))
    assert json.loads(form["ContentVariables"]) == {"first_name": "Ana", "2": "x"}


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"type": "template", "name": "order_update", "language": "en_US"}, "not a Twilio Content SID"),
        (
            {
                "type": "template",
                "name": CONTENT_SID,
                "language": "en",
                "components": [
                    {"type": "header", "parameters": [{"type": "image", "image": {"link": LINK}}]}
                ],
            },
            "only text parameters",
        ),
        (
            {"type": "template", "name": CONTENT_SID, "language": "en", "components": [{"parameters": "x"}]},
            "must be a list",
        ),
    ],
)
def test_twilio_refuses_templates_it_cannot_send(item: dict[str, Any], match: str) -> None:
    parsed = content(item)
    with pytest.raises(Unsupported, match=match):
        tw(parsed)
    with pytest.raises(Unsupported, match=match):
        ensure_supported("twilio", parsed)


def test_unsupported_is_a_value_error() -> None:
    assert issubclass(Unsupported, ValueError)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"account_sid": "AC../../x"}, "account_sid"),
        ({"auth_token": ""}, "auth_token"),
        ({"sender": ""}, "sender"),
        ({"status_callback": "/relative"}, "status_callback"),
    ],
)
def test_twilio_refuses_bad_arguments(overrides: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tw({"type": "text", "text": "hi"}, **overrides)


# --- status callback URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("public_url", "expected"),
    [
        (
            "https://parley.example.com/webhooks/twilio",
            "https://parley.example.com/webhooks/twilio?parley_message_id=msg_01HZX3Q5",
        ),
        (
            "https://parley.example.com/webhooks/twilio?",
            "https://parley.example.com/webhooks/twilio?parley_message_id=msg_01HZX3Q5",
        ),
        (
            "https://parley.example.com:8443/webhooks/twilio?tenant=a%20b&x=1",
            "https://parley.example.com:8443/webhooks/twilio?tenant=a%20b&x=1&parley_message_id=msg_01HZX3Q5",
        ),
        (
            "https://parley.example.com/webhooks/twilio?parley_message_id=old&x=1#frag",
            "https://parley.example.com/webhooks/twilio?x=1&parley_message_id=msg_01HZX3Q5",
        ),
    ],
)
def test_status_callback(public_url: str, expected: str) -> None:
    assert twilio_status_callback(public_url, MESSAGE_ID) == expected


def test_status_callback_encodes_the_id() -> None:
    url = twilio_status_callback("https://p.example/t?a=1", "conv:42/msg 7&x=1#?")
    assert url == "https://p.example/t?a=1&parley_message_id=conv%3A42%2Fmsg%207%26x%3D1%23%3F"
    assert parse_qs(urlsplit(url).query)["parley_message_id"] == ["conv:42/msg 7&x=1#?"]


def test_status_callback_is_what_twilio_signs() -> None:
    # Twilio signs the URL it calls, query included: the route must verify against this URL.
    url = twilio_status_callback("https://parley.example.com/webhooks/twilio", MESSAGE_ID)
    form = {"AccountSid": ACCOUNT, "MessageSid": "SM1", "MessageStatus": "sent", "To": TW_USER}
    signature = twilio_inbound.expected_signature(AUTH_TOKEN, url, form)
    twilio_inbound.verify_signature(AUTH_TOKEN, url, form, signature)


@given(st.text(min_size=1, max_size=40).filter(str.isprintable))
def test_status_callback_round_trips_any_id(message_id: str) -> None:
    url = twilio_status_callback("https://p.example/t?a=1&b=", message_id)
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert query == {"a": ["1"], "b": [""], "parley_message_id": [message_id]}


@pytest.mark.parametrize("public_url", ["parley.example.com/t", "ftp://p.example/t", ""])
def test_status_callback_needs_an_absolute_url(public_url: str) -> None:
    with pytest.raises(ValueError, match="public_url"):
        twilio_status_callback(public_url, MESSAGE_ID)


# --- classification: WhatsApp ----------------------------------------------------------------

WAMID = "wamid.HBgLMTY1MDM4Nzk0MzkVAgARGBJDQjZCMzlEQUE4OTJBMTE4RTUA"
WA_SENT: dict[str, Any] = {
    "messaging_product": "whatsapp",
    "contacts": [{"input": "+16505551234", "wa_id": "16505551234"}],
    "messages": [{"id": WAMID}],
}


def graph_error(code: int, message: str, details: str | None = None, **extra: Any) -> bytes:
    """A Graph API error body, as Meta's "WhatsApp error codes" page documents it."""
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    error["fbtrace_id"] = "AazCk3TbXxcWqJcaUSc7Ojs"
    error.update(extra)
    return json.dumps({"error": error}).encode()


def classify_wa(status: int | None, body: bytes = b"", retry_after: float | None = None) -> SendOutcome:
    return classify_whatsapp(status, body, retry_after, timed_out_after_send=False)


def test_whatsapp_sent() -> None:
    assert classify_wa(200, json.dumps(WA_SENT).encode()) == SendOutcome("sent", provider_message_id=WAMID)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b'{"messages": []}', b'{"messages": [{}]}', b'{"messages": [{"id": ""}]}', b"null"],
)
def test_whatsapp_2xx_without_an_id_is_in_doubt(body: bytes) -> None:
    outcome = classify_wa(200, body)
    assert outcome.kind == "in_doubt"
    assert outcome.provider_message_id is None


def test_no_answer_after_sending_is_in_doubt_and_no_connection_is_retry() -> None:
    for classify in (classify_whatsapp, classify_twilio):
        assert classify(None, b"", None, timed_out_after_send=True).kind == "in_doubt"
        assert classify(None, b"", None, timed_out_after_send=False).kind == "retry"


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        # throughput / app / account rate limits: retry
        (429, graph_error(130429, "(#130429) Rate limit hit",
                          "Cloud API message throughput has been reached."), "retry", "130429"),
        (400, graph_error(80007, "(#80007) Rate limit issues"), "retry", "80007"),
        (400, graph_error(4, "(#4) Application request limit reached"), "retry", "4"),
        (503, graph_error(2, "(#2) Service temporarily unavailable"), "retry", "2"),
        (500, graph_error(131000, "(#131000) Something went wrong"), "retry", "131000"),
        (400, graph_error(131016, "(#131016) Service unavailable"), "retry", "131016"),
        (502, b"<html>Bad Gateway</html>", "retry", None),
        (500, b"", "retry", None),
        (429, b"", "retry", None),
        (408, b"", "retry", None),
        # pair rate limit: wait for that recipient only
        (429, graph_error(131056, "(#131056) (Business Account, Consumer Account) pair rate limit hit",
                          "Message failed to send because there were too many messages sent from this "
                          "phone number to the same phone number in a short period of time."),
         "recipient_wait", "131056"),
        (400, graph_error(131056, "(#131056) (Business Account, Consumer Account) pair rate limit hit"),
         "recipient_wait", "131056"),
        # the message cannot go as is: failed
        (400, graph_error(131047, "(#131047) Re-engagement message",
                          "Message failed to send because more than 24 hours have passed since the "
                          "customer last replied to this number."), "failed", "131047"),
        (400, graph_error(131026, "(#131026) Message Undeliverable"), "failed", "131026"),
        (400, graph_error(131030, "(#131030) Recipient phone number not in allowed list",
                          "Add recipient phone number to recipient list and try again."), "failed", "131030"),
        (400, graph_error(100, "(#100) Invalid parameter", "Parameter 'to' is invalid"), "failed", "100"),
        (400, graph_error(132000, "(#132000) Number of parameters does not match the expected number "
                                  "of params",
                          "body: number of localizable_params (0) does not match the expected number "
                          "of params (1)"), "failed", "132000"),
        (404, graph_error(132001, "(#132001) Template name does not exist in the translation",
                          "template name (order_update) does not exist in pt_BR"), "failed", "132001"),
        (400, graph_error(132015, "(#132015) Template is Paused"), "failed", "132015"),
        (400, graph_error(132016, "(#132016) Template is Disabled"), "failed", "132016"),
        (400, graph_error(132068, "(#132068) Flow is in blocked state"), "failed", "132068"),
        (400, graph_error(132069, "(#132069) Flow is in throttled state"), "failed", "132069"),
        (400, graph_error(131048, "(#131048) Spam rate limit hit"), "failed", "131048"),
        (500, graph_error(131051, "(#131051) Unsupported message type"), "failed", "131051"),
        (400, graph_error(999999, "(#999999) Something new"), "failed", "999999"),
        (403, b"", "failed", None),
        (404, b"not json", "failed", None),
        # the channel cannot send at all: paused
        (401, graph_error(190, "Error validating access token: Session has expired on Friday, 01-Mar-24.",
                          error_subcode=463), "paused", "190"),
        (400, graph_error(190, "Malformed access token EAAJB"), "paused", "190"),
        (401, b"", "paused", None),
        (403, graph_error(10, "(#10) Application does not have permission for this action"), "paused", "10"),
        (403, graph_error(200, "(#200) Permissions error"), "paused", "200"),
        (400, graph_error(131031, "(#131031) Business Account locked"), "paused", "131031"),
        (400, graph_error(131042, "(#131042) Business eligibility payment issue"), "paused", "131042"),
        (403, graph_error(368, "(#368) Temporarily blocked for policies violations"), "paused", "368"),
        # a gateway got no answer after forwarding: it may have gone out
        (504, b"<html>Gateway Timeout</html>", "in_doubt", None),
    ],
)  # fmt: skip
def test_whatsapp_classification(status: int, body: bytes, kind: str, code: str | None) -> None:
    outcome = classify_wa(status, body)
    assert (outcome.kind, outcome.code) == (kind, code)
    assert outcome.provider_message_id is None
    assert outcome.title


def test_whatsapp_title_joins_message_and_details() -> None:
    body = graph_error(131047, "(#131047) Re-engagement message", "More than 24 hours have passed.")
    assert classify_wa(400, body).title == "(#131047) Re-engagement message: More than 24 hours have passed."
    body = graph_error(131026, "(#131026) Message Undeliverable", "Message Undeliverable")
    assert classify_wa(400, body).title == "(#131026) Message Undeliverable"
    assert classify_wa(403, b"").title == "HTTP 403"


def test_whatsapp_title_is_bounded() -> None:
    title = classify_wa(400, graph_error(100, "x" * 5000)).title
    assert title is not None and len(title) == 1000


def test_whatsapp_code_may_be_a_string() -> None:
    body = json.dumps({"error": {"message": "(#131056) pair rate limit hit", "code": "131056"}}).encode()
    assert classify_wa(400, body).kind == "recipient_wait"


def test_retry_after_is_kept_on_waits_only() -> None:
    throttled = graph_error(130429, "(#130429) Rate limit hit")
    assert classify_wa(429, throttled, 30.0).retry_after == 30.0
    pair = graph_error(131056, "(#131056) pair rate limit hit")
    assert classify_wa(429, pair, 6.0) == SendOutcome(
        "recipient_wait", code="131056", title="(#131056) pair rate limit hit", retry_after=6.0
    )
    assert classify_wa(503, b"", 2.5).retry_after == 2.5
    assert classify_wa(400, graph_error(131047, "(#131047) Re-engagement message"), 30.0).retry_after is None
    assert classify_wa(429, throttled, float("nan")).retry_after is None
    assert classify_wa(429, throttled, -1.0).retry_after is None


# --- classification: Twilio ------------------------------------------------------------------

TW_SENT = {
    "account_sid": ACCOUNT,
    "api_version": "2010-04-01",
    "body": "Hello",
    "direction": "outbound-api",
    "from": SANDBOX,
    "to": TW_USER,
    "sid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
    "status": "queued",
    "error_code": None,
    "error_message": None,
    "num_media": "0",
    "uri": f"/2010-04-01/Accounts/{ACCOUNT}/Messages/SM1f0e8ae6ade43cb3c0ce4525424e404f.json",
}


def twilio_error(code: int, message: str, status: int) -> bytes:
    """A Twilio REST error body: {"code", "message", "more_info", "status"}."""
    more_info = f"https://www.twilio.com/docs/errors/{code}"
    return json.dumps({"code": code, "message": message, "more_info": more_info, "status": status}).encode()


def classify_tw(status: int | None, body: bytes = b"", retry_after: float | None = None) -> SendOutcome:
    return classify_twilio(status, body, retry_after, timed_out_after_send=False)


def test_twilio_sent() -> None:
    assert classify_tw(201, json.dumps(TW_SENT).encode()) == SendOutcome(
        "sent", provider_message_id="SM1f0e8ae6ade43cb3c0ce4525424e404f"
    )


@pytest.mark.parametrize("body", [b"", b"{}", b'{"sid": null}', b'{"sid": ""}', b"[1]"])
def test_twilio_2xx_without_a_sid_is_in_doubt(body: bytes) -> None:
    assert classify_tw(201, body).kind == "in_doubt"


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (429, twilio_error(20429, "Too Many Requests", 429), "retry", "20429"),
        (503, b"", "retry", None),
        (500, twilio_error(20500, "Internal Server Error", 500), "retry", "20500"),
        (400, twilio_error(63016, "Failed to send freeform message because you are outside the allowed "
                                  "window. If you are using WhatsApp, please use a Message Template.", 400),
         "failed", "63016"),
        (400, twilio_error(21211, "The 'To' number 5551234567 is not a valid phone number.", 400),
         "failed", "21211"),
        (400, twilio_error(21614, "'To' number is not a valid mobile number", 400), "failed", "21614"),
        (400, twilio_error(21610, "Attempt to send to unsubscribed recipient", 400), "failed", "21610"),
        (400, twilio_error(21608, "The number is unverified. Trial accounts cannot send messages to "
                                  "unverified numbers", 400), "failed", "21608"),
        (400, twilio_error(21617, "The concatenated message body exceeds the 1600 character limit", 400),
         "failed", "21617"),
        (404, twilio_error(20404, "The requested resource was not found", 404), "failed", "20404"),
        (401, twilio_error(20003, "Authenticate", 401), "paused", "20003"),
        (401, b"", "paused", None),
        (403, twilio_error(20403, "403 Forbidden", 403), "paused", "20403"),
        (504, b"", "in_doubt", None),
    ],
)  # fmt: skip
def test_twilio_classification(status: int, body: bytes, kind: str, code: str | None) -> None:
    outcome = classify_tw(status, body)
    assert (outcome.kind, outcome.code) == (kind, code)
    assert outcome.title


def test_twilio_title_and_retry_after() -> None:
    outcome = classify_tw(429, twilio_error(20429, "Too Many Requests", 429), 1.5)
    assert outcome == SendOutcome("retry", code="20429", title="Too Many Requests", retry_after=1.5)
    assert classify_tw(400, twilio_error(21211, "bad To", 400), 1.5).retry_after is None


# --- waiting ---------------------------------------------------------------------------------


def test_backoff_grows_then_caps() -> None:
    delays = [backoff(n, base=1.0, factor=2.0, cap=60.0, jitter=0.0) for n in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_backoff_jitter_adds_at_most_a_fifth() -> None:
    assert backoff(3, base=1.0, factor=2.0, cap=60.0, jitter=0.5) == pytest.approx(4.4)
    assert backoff(20, base=1.0, factor=2.0, cap=60.0, jitter=0.999999) == pytest.approx(72.0, rel=1e-5)


def test_backoff_survives_huge_attempts() -> None:
    assert backoff(10_000, base=1.0, factor=10.0, cap=300.0, jitter=0.0) == 300.0


@given(
    attempt=st.integers(min_value=1, max_value=5000),
    base=st.floats(min_value=0, max_value=1e3),
    factor=st.floats(min_value=1, max_value=10),
    cap=st.floats(min_value=0, max_value=1e5),
    jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_bounds(attempt: int, base: float, factor: float, cap: float, jitter: float) -> None:
    delay = backoff(attempt, base=base, factor=factor, cap=cap, jitter=jitter)
    plain = backoff(attempt, base=base, factor=factor, cap=cap, jitter=0.0)
    assert 0 <= plain <= cap
    assert plain <= delay <= plain * 1.2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempt": 0},
        {"jitter": 1.0},
        {"jitter": -0.1},
        {"factor": 0.5},
        {"base": -1.0},
        {"cap": -1.0},
    ],
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    args: dict[str, Any] = {"attempt": 1, "base": 1.0, "factor": 2.0, "cap": 60.0, "jitter": 0.0} | kwargs
    with pytest.raises(ValueError):
        backoff(**args)


def test_next_wait() -> None:
    params: dict[str, float] = {"base": 1.0, "factor": 2.0, "cap": 60.0, "jitter": 0.0}
    assert next_wait(SendOutcome("retry"), 3, **params) == 4.0
    assert next_wait(SendOutcome("retry", retry_after=30.0), 3, **params) == 30.0
    assert next_wait(SendOutcome("retry", retry_after=1.0), 3, **params) == 4.0
    assert next_wait(SendOutcome("recipient_wait", retry_after=6.0), 1, **params) == 6.0
    kinds: tuple[OutcomeKind, ...] = ("sent", "failed", "paused", "in_doubt")
    for kind in kinds:
        assert next_wait(SendOutcome(kind), 1, **params) is None


def test_a_recipient_is_named_as_inbound_messages_name_it() -> None:
    assert contact_for("whatsapp", "+5511987654321") == "5511987654321"
    assert contact_for("whatsapp", "5511987654321") == "5511987654321"
    assert contact_for("twilio", "whatsapp:+5511987654321") == "+5511987654321"
    assert contact_for("twilio", "+5511987654321") == "+5511987654321"
