"""The bodies the simulator answers and posts, built to the providers' documented shapes, and
the checks of the requests it receives.

Pure builders and checks (no IO; ids and times are passed in or drawn from `secrets`). Sources:

* Graph API errors and WhatsApp codes: developers.facebook.com/docs/whatsapp/cloud-api/support/
  error-codes and /docs/graph-api/guides/error-handling: {"error": {"message": "(#<code>) <title>",
  "type", "code", "error_subcode"?, "error_data": {"messaging_product", "details"}, "fbtrace_id"}}.
* Send answer: /docs/whatsapp/cloud-api/reference/messages: {"messaging_product": "whatsapp",
  "contacts": [{"input", "wa_id"}], "messages": [{"id": "wamid..."}]}.
* Status webhooks: /docs/whatsapp/cloud-api/webhooks/components (statuses[] with id, status,
  timestamp, recipient_id, biz_opaque_callback_data, conversation, pricing, errors).
* Twilio Message resource (twilio.com/docs/messaging/api/message-resource), its 2010 API error
  JSON {"code", "message", "more_info", "status"} (twilio.com/docs/usage/twilios-response), and
  status callbacks (twilio.com/docs/messaging/guides/track-outbound-message-status).
"""

from __future__ import annotations

import base64
import re
import secrets
from email.utils import formatdate
from typing import Any

_MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
_WA_TYPES = _MEDIA_TYPES | {"text", "template", "interactive", "location", "contacts", "reaction"}
_E164 = re.compile(r"\+?[1-9][0-9]{6,14}")
GRAPH_ERRORS_URL = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"

# code: (HTTP status, title, details). The titles are Meta's; `details` is what error_data carries.
WA_ERRORS: dict[int, tuple[int, str, str]] = {
    2: (503, "Service temporarily unavailable", "Temporary due to downtime or due to being overloaded."),
    4: (429, "Application request limit reached", "The app has reached its API call rate limit."),
    100: (400, "Invalid parameter", "The request included one or more unsupported or misspelled parameters."),
    190: (401, "Access token has expired", "Your access token has expired."),
    80007: (429, "Rate limit issues", "The WhatsApp Business Account has reached its rate limit."),
    130429: (
        429,
        "Rate limit hit",
        "Message failed to send because there were too many messages sent from this phone number "
        "in a short period of time",
    ),
    131000: (500, "Something went wrong", "Message failed to send due to an unknown error."),
    131026: (400, "Message undeliverable", "Unable to deliver message."),
    131047: (
        400,
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer last "
        "replied to this number.",
    ),
    131056: (
        429,
        "(Business Account, Consumer Account) pair rate limit hit",
        "Message failed to send because there were too many messages sent from this phone number "
        "to the same phone number in a short period of time",
    ),
    132001: (400, "Template name does not exist in the translation", "template name does not exist"),
}

# code: (HTTP status, message). Status-callback-only codes (63016, 30xxx) have a status too, for
# the rare test that wants them answered synchronously.
TW_ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20429: (429, "Too Many Requests"),
    20500: (500, "Internal Server Error"),
    21211: (400, "Invalid 'To' Phone Number"),
    21603: (400, "A 'From' phone number is required."),
    21604: (400, "A 'To' phone number is required."),
    21610: (400, "Attempt to send to unsubscribed recipient"),
    21619: (400, "A text message body or media urls must be specified."),
    21910: (400, "Invalid 'From' and 'To' pair. 'From' and 'To' should be of the same channel"),
    30008: (400, "Unknown error"),
    63016: (
        400,
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template.",
    ),
}


def fbtrace_id() -> str:
    return "A" + secrets.token_urlsafe(16)


def wamid() -> str:
    """A fresh WhatsApp message id: "wamid." and standard base64 (so it may hold + / =)."""
    return "wamid." + base64.b64encode(b"\x15\x02\x00\x11\x18\x12" + secrets.token_bytes(18)).decode()


def twilio_sid(media: bool) -> str:
    """SM<32 hex>, or MM<32 hex> for a message with media (both prefixes are documented)."""
    return ("MM" if media else "SM") + secrets.token_hex(16)


def wa_id(to: str) -> str:
    """The wa_id Meta reports for an input number: its digits."""
    return re.sub(r"\D", "", to) or to


def graph_error(
    code: int, details: str | None = None, subcode: int | None = None, message: str | None = None
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Graph error body) for a WhatsApp code."""
    status, title, default_details = WA_ERRORS.get(code, (400, "Unknown error", "Unknown error."))
    error: dict[str, Any] = {
        "message": message or f"(#{code}) {title}",
        "type": "OAuthException",
        "code": code,
        "error_data": {"messaging_product": "whatsapp", "details": details or default_details},
        "fbtrace_id": fbtrace_id(),
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    return status, {"error": error}


def wa_send_answer(to: str, message_id: str) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": wa_id(to)}],
        "messages": [{"id": message_id}],
    }


def wa_status(
    *,
    message_id: str,
    status: str,
    timestamp: int,
    recipient: str,
    opaque: str | None,
    category: str,
    error_code: int | None = None,
) -> dict[str, Any]:
    """One statuses[] item; conversation and pricing on sent/delivered/read as Meta sends them."""
    item: dict[str, Any] = {
        "id": message_id,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": wa_id(recipient),
    }
    if opaque is not None:
        item["biz_opaque_callback_data"] = opaque
    if status == "failed":
        code = error_code if error_code is not None else 131026
        _, title, details = WA_ERRORS.get(code, (400, "Unknown error", "Unknown error."))
        item["errors"] = [
            {
                "code": code,
                "title": title,
                "message": title,
                "error_data": {"details": details},
                "href": GRAPH_ERRORS_URL,
            }
        ]
    else:
        item["conversation"] = {"id": secrets.token_hex(16), "origin": {"type": category}}
        item["pricing"] = {"billable": True, "pricing_model": "PMP", "category": category}
    return item


def wa_envelope(
    *, waba_id: str, phone_number_id: str, display_phone_number: str, statuses: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": waba_id,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "statuses": statuses,
                        },
                    }
                ],
            }
        ],
    }


def twilio_error(code: int, message: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, 2010 API error body) for a Twilio code."""
    status, default = TW_ERRORS.get(code, (400, "Bad Request"))
    return status, {
        "code": code,
        "message": message or default,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def twilio_message(
    *, sid: str, account_sid: str, to: str, sender: str, body: str, num_media: int, now: float
) -> dict[str, Any]:
    """The Message resource as the create call answers it (status queued)."""
    created = formatdate(now, usegmt=True).replace("GMT", "+0000")
    uri = f"/2010-04-01/Accounts/{account_sid}/Messages/{sid}"
    return {
        "sid": sid,
        "account_sid": account_sid,
        "messaging_service_sid": None,
        "to": to,
        "from": sender,
        "body": body,
        "status": "queued",
        "num_segments": "1",
        "num_media": str(num_media),
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "price": None,
        "price_unit": "USD",
        "error_code": None,
        "error_message": None,
        "date_created": created,
        "date_updated": created,
        "date_sent": None,
        "uri": uri + ".json",
        "subresource_uris": {"media": uri + "/Media.json"},
    }


def twilio_status_form(
    *, sid: str, account_sid: str, to: str, sender: str, status: str, error_code: int | None
) -> dict[str, str]:
    """A status callback's form parameters (the subset Twilio documents, plus the WhatsApp extras)."""
    form = {
        "MessageSid": sid,
        "SmsSid": sid,
        "SmsStatus": status,
        "MessageStatus": status,
        "AccountSid": account_sid,
        "From": sender,
        "To": to,
        "ApiVersion": "2010-04-01",
    }
    if to.startswith("whatsapp:"):
        form["ChannelPrefix"] = "whatsapp"
        form["ChannelToAddress"] = to.removeprefix("whatsapp:")
    if error_code is not None:
        form["ErrorCode"] = str(error_code)
        form["ErrorMessage"] = TW_ERRORS.get(error_code, (400, "Unknown error"))[1]
    return form


# ---- requests: what the providers refuse as malformed ------------------------------------------


def wa_body_problem(body: object, templates: list[str] | None) -> tuple[int, str] | None:
    """(code, details) of what is wrong with a send body, or None when it is well-formed."""
    if not isinstance(body, dict):
        return 100, "The request body must be a JSON object"
    if body.get("messaging_product") != "whatsapp":
        return 100, "The parameter messaging_product is required and must be 'whatsapp'"
    to = body.get("to")
    if not isinstance(to, str) or not to.strip():
        return 100, "The parameter to is required"
    if body.get("recipient_type", "individual") != "individual":
        return 100, "recipient_type must be 'individual'"
    kind = body.get("type", "text")
    if kind not in _WA_TYPES:
        return 100, f"Unsupported message type: {str(kind)[:40]}"
    content = body.get(kind)
    if not isinstance(content, dict):
        return 100, f"The parameter {kind} is required and must be an object"
    opaque = body.get("biz_opaque_callback_data")
    if opaque is not None and (not isinstance(opaque, str) or len(opaque) > 512):
        return 100, "biz_opaque_callback_data must be a string of at most 512 characters"
    return _content_problem(kind, content, templates)


def _content_problem(
    kind: str, content: dict[str, Any], templates: list[str] | None
) -> tuple[int, str] | None:
    if kind == "text":
        text = content.get("body")
        if not isinstance(text, str) or not text or len(text) > 4096:
            return 100, "text.body is required: a string of 1 to 4096 characters"
    elif kind in _MEDIA_TYPES:
        if not isinstance(content.get("link"), str) and not isinstance(content.get("id"), str):
            return 100, f"{kind}.link or {kind}.id is required"
        caption = content.get("caption")
        if caption is not None and not isinstance(caption, str):
            return 100, f"{kind}.caption must be a string"
    elif kind == "template":
        name = content.get("name")
        language = content.get("language")
        if not isinstance(name, str) or not name:
            return 100, "template.name is required"
        if not isinstance(language, dict) or not isinstance(language.get("code"), str):
            return 100, "template.language.code is required"
        if not isinstance(content.get("components", []), list):
            return 100, "template.components must be a list"
        if templates is not None and name not in templates:
            return 132001, f"template name ({name[:60]}) does not exist in {language['code'][:10]}"
    return None


def twilio_form_problem(form: dict[str, str], media: list[str]) -> int | None:
    """The Twilio error code of a malformed create request, or None."""
    if not form.get("To"):
        return 21604
    if not form.get("From"):
        return 21603
    if not form.get("Body") and not media and not form.get("ContentSid"):
        return 21619
    if not _E164.fullmatch(form["To"].removeprefix("whatsapp:")):
        return 21211
    if _channel(form["To"]) != _channel(form["From"]):
        return 21910  # e.g. From whatsapp:+1..., To +55...: Twilio sends within one channel
    return None


def _channel(address: str) -> str:
    """A Twilio address's channel: "whatsapp" for "whatsapp:+1...", "" for a plain number."""
    prefix, colon, _ = address.partition(":")
    return prefix if colon else ""
