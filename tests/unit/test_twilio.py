"""Tests for channels.twilio: inbound messages, status callbacks, X-Twilio-Signature."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.signatures import SignatureError
from channels.twilio import (
    TwilioPayloadError,
    TwMessage,
    TwStatus,
    expected_signature,
    parse_form,
    verify_signature,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "twilio"
ACCOUNT = "AC3f9a1c0b7d2e4f6a8b9c0d1e2f3a4b5c"
SANDBOX = "+14155238886"


def load(name: str) -> dict[str, str]:
    """A fixture as the route sees it: the x-www-form-urlencoded body, decoded."""
    lines = (FIXTURES / name).read_text().splitlines()
    assert lines[0].startswith("# source: "), f"{name} must say where its shape comes from"
    body = "&".join(line for line in lines if line and not line.startswith("#"))
    return dict(parse_qsl(body, keep_blank_values=True, strict_parsing=True))


def message(name: str) -> TwMessage:
    parsed = parse_form(load(name))
    assert isinstance(parsed, TwMessage)
    return parsed


def status(name: str) -> TwStatus:
    parsed = parse_form(load(name))
    assert isinstance(parsed, TwStatus)
    return parsed


def test_every_fixture_names_its_source() -> None:
    names = sorted(p.name for p in FIXTURES.glob("*.txt"))
    assert len(names) == 10
    for name in names:
        assert "Twilio docs" in (FIXTURES / name).read_text().splitlines()[0], name


def test_inbound_sms() -> None:
    form = load("inbound_sms.txt")
    parsed = message("inbound_sms.txt")
    assert parsed == TwMessage(
        account_sid=ACCOUNT,
        contact_id="+14017122661",
        to="+14155550123",
        provider_message_id="SMa1b2c3d4a1b2c3d4a1b2c3d4a1b2c3d4",
        type="text",
        text="Ahoy! Is the shop open on Sunday?",
        payload={**{k: v for k, v in form.items() if k != "Body"}, "media": [], "channel": "sms"},
    )
    assert len(parsed.provider_message_id) == 34
    assert parsed.payload["FromCity"] == "PROVIDENCE"


def test_inbound_whatsapp_text_strips_the_prefix() -> None:
    parsed = message("inbound_whatsapp_text.txt")
    assert parsed.contact_id == "+16505551234"
    assert parsed.to == SANDBOX
    assert parsed.type == "text"
    assert parsed.text == "Does it come in another color?"
    assert parsed.payload["channel"] == "whatsapp"
    # The raw params stay as Twilio sent them.
    assert parsed.payload["From"] == "whatsapp:+16505551234"
    assert parsed.payload["ProfileName"] == "Sheena Nelson"
    assert parsed.payload["WaId"] == "16505551234"


def test_inbound_whatsapp_with_two_media() -> None:
    form = load("inbound_whatsapp_media.txt")
    parsed = message("inbound_whatsapp_media.txt")
    assert parsed.type == "image"
    assert parsed.text is None
    assert parsed.provider_message_id.startswith("MM")
    assert parsed.payload["media"] == [
        {"url": form["MediaUrl0"], "content_type": "image/jpeg"},
        {"url": form["MediaUrl1"], "content_type": "application/pdf"},
    ]
    assert parsed.payload["media"][1]["url"].endswith("/Media/MEe5f6a7b8e5f6a7b8e5f6a7b8e5f6a7b8")


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("image/jpeg", "image"),
        ("audio/ogg", "audio"),
        ("video/mp4", "video"),
        ("application/pdf", "document"),
        ("text/vcard", "document"),
        ("IMAGE/PNG", "image"),
    ],
)
def test_media_kind_comes_from_the_first_content_type(content_type: str, kind: str) -> None:
    form = load("inbound_whatsapp_media.txt")
    form["MediaContentType0"] = content_type
    parsed = parse_form(form)
    assert isinstance(parsed, TwMessage)
    assert parsed.type == kind


def test_media_with_a_caption_keeps_the_body() -> None:
    form = load("inbound_whatsapp_media.txt")
    form["Body"] = "Here is the invoice"
    parsed = parse_form(form)
    assert isinstance(parsed, TwMessage)
    assert parsed.text == "Here is the invoice"


def test_inbound_whatsapp_location() -> None:
    parsed = message("inbound_whatsapp_location.txt")
    assert parsed.type == "location"
    assert parsed.text == "Lucky Shrub, 101 Forest Ave, Palo Alto, CA 94301"
    assert parsed.payload["Latitude"] == "37.44221496582"
    assert parsed.payload["Longitude"] == "-122.16151428223"


def test_a_dropped_pin_reads_as_coordinates() -> None:
    form = load("inbound_whatsapp_location.txt")
    del form["Address"], form["Label"]
    parsed = parse_form(form)
    assert isinstance(parsed, TwMessage)
    assert parsed.text == "37.44221496582,-122.16151428223"


def test_inbound_whatsapp_button() -> None:
    parsed = message("inbound_whatsapp_button.txt")
    assert parsed.type == "button"
    assert parsed.text == "Yes, confirm"
    assert parsed.payload["ButtonPayload"] == "confirm_booking_42"
    assert parsed.payload["OriginalRepliedMessageSid"] == "SM9f8e7d6c9f8e7d6c9f8e7d6c9f8e7d6c"


def test_sms_sid_stands_in_for_a_missing_message_sid() -> None:
    form = load("inbound_sms.txt")
    del form["MessageSid"]
    parsed = parse_form(form)
    assert parsed.provider_message_id == form["SmsSid"]


@pytest.mark.parametrize(
    ("fixture", "value", "recipient", "error_code", "error_message"),
    [
        ("status_sent.txt", "sent", "+15558675310", None, None),
        ("status_delivered.txt", "delivered", "+15558675310", None, None),
        ("status_read_whatsapp.txt", "read", "+16505551234", None, None),
        ("status_failed.txt", "failed", "+15558675310", "30008", "Unknown error"),
        ("status_undelivered.txt", "undelivered", "+15558675310", "30003", "Unreachable destination handset"),
    ],
)
def test_status_callbacks(
    fixture: str, value: str, recipient: str, error_code: str | None, error_message: str | None
) -> None:
    form = load(fixture)
    parsed = status(fixture)
    assert parsed == TwStatus(
        account_sid=ACCOUNT,
        recipient_id=recipient,
        provider_message_id=form["MessageSid"],
        status=value,
        error_code=error_code,
        error_message=error_message,
        payload=form,
    )


@pytest.mark.parametrize("value", ["accepted", "queued", "sending", "scheduled", "canceled", "receiving"])
def test_other_status_values_are_kept_as_given(value: str) -> None:
    form = load("status_sent.txt")
    form["MessageStatus"] = value
    parsed = parse_form(form)
    assert isinstance(parsed, TwStatus)
    assert parsed.status == value


def test_a_receipt_that_carries_a_body_is_still_a_status() -> None:
    form = load("status_delivered.txt")
    form["Body"] = "Your order shipped"
    form["NumMedia"] = "0"
    assert isinstance(parse_form(form), TwStatus)


def test_received_status_marks_an_inbound_message() -> None:
    form = load("inbound_sms.txt")
    del form["Body"], form["NumMedia"], form["SmsStatus"]
    form["MessageStatus"] = "received"
    parsed = parse_form(form)
    assert isinstance(parsed, TwMessage)
    assert parsed.text == ""


def test_empty_error_code_is_none() -> None:
    form = load("status_sent.txt")
    form["ErrorCode"] = ""
    parsed = parse_form(form)
    assert isinstance(parsed, TwStatus)
    assert parsed.error_code is None


@pytest.mark.parametrize(
    ("fixture", "drop", "error"),
    [
        ("inbound_sms.txt", ("AccountSid",), "AccountSid is missing"),
        ("inbound_sms.txt", ("MessageSid", "SmsSid"), r"MessageSid \(or SmsSid\) is missing"),
        ("inbound_sms.txt", ("From",), "From is missing"),
        ("inbound_sms.txt", ("To",), "To is missing"),
        ("status_failed.txt", ("AccountSid",), "AccountSid is missing"),
        ("status_failed.txt", ("MessageSid", "SmsSid"), r"MessageSid \(or SmsSid\) is missing"),
        ("status_failed.txt", ("To",), "To is missing"),
        ("inbound_whatsapp_media.txt", ("MediaUrl1",), "MediaUrl1 is missing but NumMedia is 2"),
        ("inbound_whatsapp_media.txt", ("MediaContentType0",), "MediaContentType0 is missing but NumMedia"),
    ],
)
def test_missing_params(fixture: str, drop: tuple[str, ...], error: str) -> None:
    form = load(fixture)
    for name in drop:
        del form[name]
    with pytest.raises(TwilioPayloadError, match=error):
        parse_form(form)


@pytest.mark.parametrize("value", ["", "-1", "two", "1.0", " 1", "\N{SUPERSCRIPT TWO}"])
def test_bad_num_media(value: str) -> None:
    form = load("inbound_sms.txt")
    form["NumMedia"] = value
    with pytest.raises(TwilioPayloadError, match="NumMedia must be a non-negative integer"):
        parse_form(form)


def test_huge_num_media_fails_fast() -> None:
    form = load("inbound_sms.txt")
    form["NumMedia"] = "999999999"
    with pytest.raises(TwilioPayloadError, match="MediaUrl0 is missing but NumMedia is 999999999"):
        parse_form(form)
    form["NumMedia"] = "9" * 5000
    with pytest.raises(TwilioPayloadError, match="NumMedia must be a non-negative integer"):
        parse_form(form)


def test_neither_message_nor_status() -> None:
    with pytest.raises(TwilioPayloadError, match="neither an inbound message"):
        parse_form({"AccountSid": ACCOUNT, "MessageSid": "SM1", "From": "+1", "To": "+2"})


# Twilio's own validator test vector: twilio/twilio-python, tests/unit/test_request_validator.py
# (auth token "12345", this URL and these params sign to "RSOYDt4T1cUTdK1PDd93/VVr8B8=").
TWILIO_TOKEN = "12345"
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
TWILIO_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_signature_matches_twilios_published_vector() -> None:
    assert expected_signature(TWILIO_TOKEN, TWILIO_URL, TWILIO_PARAMS) == TWILIO_SIGNATURE
    verify_signature(TWILIO_TOKEN, TWILIO_URL, TWILIO_PARAMS, TWILIO_SIGNATURE)


def test_signature_of_a_fixture_round_trips() -> None:
    form = load("inbound_whatsapp_media.txt")
    url = "https://parley.example.com/webhooks/twilio/ch_1"
    header = expected_signature("auth-token", url, form)
    verify_signature("auth-token", url, form, header)
    # Twilio signs decoded values: "+" and ":" as themselves, not %2B / %3A.
    assert header != expected_signature("auth-token", url, {**form, "From": "whatsapp%3A%2B16505551234"})


def test_param_order_does_not_matter() -> None:
    reordered = dict(reversed(list(TWILIO_PARAMS.items())))
    assert list(reordered) != list(TWILIO_PARAMS)
    verify_signature(TWILIO_TOKEN, TWILIO_URL, reordered, TWILIO_SIGNATURE)


@pytest.mark.parametrize(
    ("token", "url", "params"),
    [
        ("12346", TWILIO_URL, TWILIO_PARAMS),
        (TWILIO_TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=3", TWILIO_PARAMS),
        (TWILIO_TOKEN, "http://mycompany.com/myapp.php?foo=1&bar=2", TWILIO_PARAMS),
        (TWILIO_TOKEN, "https://mycompany.com/myapp.php", TWILIO_PARAMS),
        (TWILIO_TOKEN, TWILIO_URL, {**TWILIO_PARAMS, "Digits": "1235"}),
        (TWILIO_TOKEN, TWILIO_URL, {**TWILIO_PARAMS, "Extra": ""}),
        (TWILIO_TOKEN, TWILIO_URL, {k: v for k, v in TWILIO_PARAMS.items() if k != "Caller"}),
        # Same characters, but a param's value moved onto another name: the pairing is signed.
        (TWILIO_TOKEN, TWILIO_URL, {**TWILIO_PARAMS, "From": "+18005551212", "To": "+14158675309"}),
    ],
)
def test_any_change_breaks_the_signature(token: str, url: str, params: dict[str, str]) -> None:
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_signature(token, url, params, TWILIO_SIGNATURE)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing X-Twilio-Signature header"),
        ("", "missing X-Twilio-Signature header"),
        ("RSOYDt4T1cUTdK1PDd93/VVr8B8", "signature does not match"),
        ("rsoydt4t1cutdk1pdd93/vvr8b8=", "signature does not match"),
        ("RSOYDt4T1cUTdK1PDd93/VVr8B8=ü", "signature does not match"),
    ],
)
def test_bad_signature_headers(header: str | None, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify_signature(TWILIO_TOKEN, TWILIO_URL, TWILIO_PARAMS, header)


@settings(database=None)
@given(
    token=st.text(min_size=1, max_size=40),
    params=st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=30), max_size=8),
)
def test_signed_forms_verify_and_a_changed_value_does_not(token: str, params: dict[str, str]) -> None:
    url = "https://parley.example.com/webhooks/twilio"
    header = expected_signature(token, url, params)
    verify_signature(token, url, params, header)
    changed = {**params, "Body": params.get("Body", "") + "!"}
    with pytest.raises(SignatureError):
        verify_signature(token, url, changed, header)


FORM_NAMES = [
    "AccountSid", "MessageSid", "SmsSid", "From", "To", "Body", "NumMedia", "MediaUrl0", "MediaUrl1",
    "MediaContentType0", "MediaContentType1", "Latitude", "Longitude", "Label", "Address", "ButtonText",
    "MessageStatus", "SmsStatus", "ErrorCode", "ErrorMessage",
]  # fmt: skip


@settings(database=None)
@given(
    form=st.dictionaries(
        st.sampled_from(FORM_NAMES),
        st.one_of(
            st.sampled_from(["", "0", "1", "2", "received", "delivered", "whatsapp:+1", "image/png"]),
            st.text(),
        ),
    )
)
def test_any_form_parses_or_says_which_param_is_wrong(form: dict[str, str]) -> None:
    try:
        parsed = parse_form(form)
    except TwilioPayloadError as exc:
        assert str(exc)
    else:
        assert parsed.account_sid == form["AccountSid"]
        assert parsed.provider_message_id in (form.get("MessageSid"), form.get("SmsSid"))
