"""Outbound messages: what Parley may send, the provider request for it, and what the answer means.

Pure, like the rest of `channels`: the sender agent does the IO (HTTP, lanes, rate limiters,
timers); this module builds the exact request bytes and classifies the exact answer. Nothing
here reads the clock or draws random numbers (`backoff` takes its jitter as a parameter).

Content (`OUTBOUND_CONTENT`) is the body of `POST /v1/conversations/{id}/messages` without the
routing: text, image, document, audio, video or template. Everything but a template is
free-form, which WhatsApp only lets a business send inside the 24 h customer-service window.

Requests: `whatsapp_request` (Graph API `POST /{version}/{phone_number_id}/messages`, JSON) and
`twilio_request` (`POST /2010-04-01/Accounts/{sid}/Messages.json`, form-encoded). Both carry
Parley's message id so a status that arrives without the send's answer can still be matched:
Meta echoes `biz_opaque_callback_data` in every status webhook (statuses[].biz_opaque_callback_data,
at most 512 characters); Twilio calls the StatusCallback URL, to which `twilio_status_callback`
appends `parley_message_id=<id>`.

Templates over Twilio: Twilio sends WhatsApp templates as Content API templates, by Content SID
(`ContentSid=HX...` plus `ContentVariables`); since 2025-04-01 a template text in `Body` outside
the window fails with 63016. So a template whose name is a Content SID (HX + 32 hex digits) is
sent that way, and any other name is refused with `Unsupported` (Parley cannot map a Meta
template name to a Content SID). ContentVariables are the template's text parameters, keyed by
their `parameter_name` when they have one, else numbered "1", "2", ... in order across the
components (header, body, buttons); a non-text parameter (image, currency, ...) is refused. The
template's `language` is not sent: a Content SID names one content, language included. The
WhatsApp Cloud API refuses a Content SID as a template name (`Unsupported` too).
`ensure_supported(provider, content)` runs the same checks up front (e.g. to answer 422 at
`POST /messages` time instead of failing at send time).

Classification: `classify_whatsapp` / `classify_twilio` map (HTTP status, body, Retry-After) to a
`SendOutcome`. Provider error codes decide first (Meta says to build error handling on `code`,
not on HTTP status, and sends e.g. 190 with HTTP 400 as well as 401); the HTTP status decides
when the code is unknown or absent.

retry
    WhatsApp: 4 app call limit, 80007 WABA rate limit, 130429 throughput; 2 service temporarily
    down, 131000 something went wrong, 131016 service overloaded; HTTP 429, 408, 5xx but 504.
    Twilio: 20429 too many requests; HTTP 429, 408, 5xx but 504.
    Both: no connection, the request was never sent (status None, timed_out_after_send False).
recipient_wait
    WhatsApp: 131056 (business, consumer) pair rate limit. Twilio: none.
failed
    WhatsApp: 131047 re-engagement (outside 24 h), 131026 undeliverable, 131030 recipient not
    in allowed list (test numbers), 100 invalid parameter, 131008 / 131009 missing / invalid
    parameter, 131051 unsupported type, 130497 country restricted, 131048 spam rate limit,
    132000-132069 template and flow errors (132000 parameter count, 132001 no such template,
    132015 paused, 132016 disabled, 132068 flow blocked, 132069 flow throttled); any other 4xx.
    Twilio: 63016 outside the window, 21211 invalid To, 21614 not a mobile number, 21610
    unsubscribed (STOP), 21608 unverified number (trial); any other 4xx.
paused
    WhatsApp: 190 token expired, 0 AuthException, 3 / 10 / 200-299 / 131005 permission,
    131031 business account locked, 131042 payment issue, 368 blocked for policy violations;
    HTTP 401. Twilio: 20003 authenticate (bad SID or token), 20403 account suspended; HTTP 401.
in_doubt
    Both: no answer after the request was sent (status None, timed_out_after_send True); HTTP
    504 without a known code; 2xx without messages[0].id (WhatsApp) or sid (Twilio).

Deliberate readings (the issue had question marks):
- 131031 is "Business Account locked" (the WABA is restricted for a policy violation or a wrong
  two-step PIN), not a blocked recipient: every send of the channel would fail the same way, so
  it pauses the channel, as do the other account-wide codes (permissions, payment, 368).
- 131056 is per (business number, recipient) pair: wait for that recipient only.
- 132069 "flow is throttled" is hourly per flow: not worth a short retry, so failed.
- HTTP 504 is a gateway that got no answer from upstream after forwarding the request: the
  message may have gone out, so in_doubt rather than retry (a retry could send it twice).

Sources checked (search tool, 2026). Meta's own error page only yielded its introduction and
envelope, so the per-code meanings come from pages that reproduce its table:
- Meta, "WhatsApp error codes",
  developers.facebook.com/documentation/business-messaging/whatsapp/support/error-codes: error
  envelope `{"error": {"message", "type", "code", "error_data": {"messaging_product", "details"},
  "error_subcode", "fbtrace_id"}}`; "build error handling on code and details", titles in
  `message` will be deprecated.
- The table with HTTP statuses, docs.ycloud.com/en/api-reference/guides/whatsapp-platform/
  handle-whatsapp-errors: 2 service (503), 100 invalid parameter (400), 130429 rate limit hit
  (429), 131000 something went wrong (500), 131008 missing parameter (400), 131026 undeliverable
  (400); its sample of 131056 "(Business Account, Consumer Account) pair rate limit hit" over
  HTTP 429.
- developers.kaleyra.io/docs/cloud-api-error-codes and niswey.com/knowledge-base/error-codes-meta:
  0 AuthException, 3 / 10 / 200-299 permission, 190 access token has expired, 4 API too many
  calls, 80007 WABA rate limit, 368 restricted for a policy violation, 131048 spam rate limit;
  help.chakrahq.com: 4 comes with HTTP 400. MarcosNicolau/whatsapp-business-sdk
  src/types/error.ts (titles): 131005 access denied, 131016 service overloaded, 131042 payment
  issue, 131047 re-engagement message, 131051 unsupported type, 132000-132012 template errors.
- Per code: dualhook.com/docs/whatsapp-error-131056 (Meta's text: "You can still send messages
  to a different phone number without waiting") and .../whatsapp-error-131031 ("restricted or
  disabled for violating a platform policy, or ... the two-step pin ... is incorrect");
  wanotifier / heltar: 132015 template paused (3 h, 6 h, then disabled = 132016), 132069 flow
  throttled ("10 messages using this flow were already sent in the last hour");
  useinvent.com: 130497 country restricted; 131030 "recipient phone number not in allowed list"
  (test numbers) only from integrators' READMEs; 132068 "flow blocked" from memory of Meta's
  table, not confirmed; sixoverground/instagram_graph_api#3: Graph sends 190 over HTTP 400 too.
- Meta, "Document messages" and the Messages API: `{"messaging_product": "whatsapp",
  "recipient_type": "individual", "to", "type", "<type>": {...}}`, document {link, caption
  (max 1024), filename}; text {body, preview_url}; template {name, language: {code},
  components}; success `{"messages": [{"id": "wamid..."}]}`; biz_opaque_callback_data
  (whatsapp-api-js ClientMessageRequest docs: "arbitrary 512B string ... returned as part of
  sent/delivered/read message webhooks").
- Twilio error dictionary, twilio.com/docs/api/errors/<code>: 20429 "Too many requests ... 429
  responses aren't processed and are safe to retry"; 20003 "Permission Denied" (HTTP 401,
  wrong SID/token, deleted token, suspended account); 20403 "account suspended or closed";
  21211 invalid 'To'; 21614 not a valid mobile number; 21608 unverified number (trial);
  63016 "Outside messaging window. For WhatsApp, use a Message Template" (ContentSid +
  ContentVariables). 21610 unsubscribed recipient (STOP) only through a third-party list
  (TundraSoft/tundra-connect wiki). Error body `{"code", "message",
  "more_info", "status"}`.
- Twilio Message resource: To, From, Body, MediaUrl, StatusCallback, ContentSid,
  ContentVariables; "Guidance on WhatsApp media messages": Twilio sets no filename (nor
  document caption) on WhatsApp documents, so `filename` is not sent over Twilio.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote_plus, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_LINK = 2000
MAX_COMPONENTS = 20
MAX_CALLBACK_DATA = 512  # Meta's limit on biz_opaque_callback_data
_CONTENT_SID = re.compile(r"HX[0-9a-fA-F]{32}")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # no whitespace or control characters in a link


def _https_link(link: str) -> str:
    if _CONTROL.search(link):
        raise ValueError("link must not contain spaces or control characters")
    try:
        parts = urlsplit(link)
    except ValueError as exc:
        raise ValueError(f"link is not a URL: {exc}") from exc
    if parts.scheme.lower() != "https":
        raise ValueError("link must be an https:// URL (the provider fetches it)")
    if not parts.hostname:
        raise ValueError("link must name a host")
    return link


HttpsLink = Annotated[str, Field(min_length=1, max_length=MAX_LINK), AfterValidator(_https_link)]
Caption = Annotated[str, Field(min_length=1, max_length=MAX_CAPTION)]


class _Content(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TextContent(_Content):
    type: Literal["text"]
    text: str = Field(min_length=1, max_length=MAX_TEXT)


class ImageContent(_Content):
    type: Literal["image"]
    link: HttpsLink
    caption: Caption | None = None


class DocumentContent(_Content):
    type: Literal["document"]
    link: HttpsLink
    caption: Caption | None = None
    filename: str | None = Field(default=None, min_length=1, max_length=255)


class AudioContent(_Content):
    """No caption: WhatsApp shows none on audio (extra="forbid" refuses the field by name)."""

    type: Literal["audio"]
    link: HttpsLink


class VideoContent(_Content):
    type: Literal["video"]
    link: HttpsLink
    caption: Caption | None = None


class TemplateContent(_Content):
    """A pre-approved template: the only content WhatsApp delivers outside the 24 h window.

    `name` is a Meta template name ([a-z0-9_]) or, for Twilio channels, a Content SID (HX...).
    `components` go to Meta as given (header/body/button parameters).
    """

    type: Literal["template"]
    name: str = Field(min_length=1, max_length=512, pattern=r"^(?:[a-z0-9_]+|HX[0-9a-fA-F]{32})$")
    language: str = Field(pattern=r"^[a-z]{2,3}(?:_[A-Z]{2})?$")  # "en", "en_US", "pt_BR", "fil"
    components: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_COMPONENTS)


OutboundContent = Annotated[
    TextContent | ImageContent | DocumentContent | AudioContent | VideoContent | TemplateContent,
    Field(discriminator="type"),
]
OUTBOUND_CONTENT: TypeAdapter[OutboundContent] = TypeAdapter(OutboundContent)

_MediaContent = ImageContent | DocumentContent | AudioContent | VideoContent


def is_free_form(content: OutboundContent) -> bool:
    """Whether the 24 h customer-service window restricts this content (all but templates)."""
    return not isinstance(content, TemplateContent)


class Unsupported(ValueError):
    """The provider cannot send this content as Parley holds it; the message says why."""


def ensure_supported(provider: Literal["whatsapp", "twilio"], content: OutboundContent) -> None:
    """Raise Unsupported if the provider's builder would refuse the content (same checks)."""
    if not isinstance(content, TemplateContent):
        return
    if provider == "whatsapp":
        _meta_template_name(content)
    else:
        _twilio_template(content)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderRequest:
    """One HTTP POST to a provider. `headers` hold the credentials, so repr() leaves them out."""

    url: str
    headers: dict[str, str] = field(repr=False)
    body: bytes


_VERSION = re.compile(r"v[0-9]{1,3}\.[0-9]{1,3}")
_PHONE_NUMBER_ID = re.compile(r"[0-9]{1,32}")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")


def whatsapp_request(
    *,
    graph_base: str,
    version: str,
    phone_number_id: str,
    access_token: str,
    to: str,
    content: OutboundContent,
    message_id: str,
) -> ProviderRequest:
    """The Cloud API send request; `message_id` rides along as biz_opaque_callback_data.

    ValueError on a malformed argument (version "v21.0", numeric phone_number_id, message_id of
    at most 512 characters); Unsupported for a Twilio Content SID used as template name.
    """
    _require_base(graph_base, "graph_base")
    if not _VERSION.fullmatch(version):
        raise ValueError(f"version must look like 'v21.0' (got {version[:20]!r})")
    if not _PHONE_NUMBER_ID.fullmatch(phone_number_id):
        raise ValueError("phone_number_id must be 1 to 32 digits")
    _require_token(access_token, "access_token")
    _require_text(to, "to")
    _require_message_id(message_id)
    if len(message_id) > MAX_CALLBACK_DATA:
        raise ValueError(f"message_id must be at most {MAX_CALLBACK_DATA} characters (Meta's limit)")
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": content.type,
        content.type: _whatsapp_object(content),
        "biz_opaque_callback_data": message_id,
    }
    return ProviderRequest(
        url=f"{graph_base.rstrip('/')}/{version}/{phone_number_id}/messages",
        headers={"Authorization": f"Bearer {access_token}", "Content-Type": "application/json"},
        body=orjson.dumps(body),
    )


def _whatsapp_object(content: OutboundContent) -> dict[str, Any]:
    if isinstance(content, TextContent):
        return {"body": content.text, "preview_url": False}
    if isinstance(content, TemplateContent):
        template: dict[str, Any] = {
            "name": _meta_template_name(content),
            "language": {"code": content.language},
        }
        if content.components:
            template["components"] = content.components
        return template
    media: dict[str, Any] = {"link": content.link}
    if not isinstance(content, AudioContent) and content.caption is not None:
        media["caption"] = content.caption
    if isinstance(content, DocumentContent) and content.filename is not None:
        media["filename"] = content.filename
    return media


def _meta_template_name(content: TemplateContent) -> str:
    if _CONTENT_SID.fullmatch(content.name):
        raise Unsupported(
            f"template {content.name!r} is a Twilio Content SID; the WhatsApp Cloud API sends "
            "templates by their Meta name ([a-z0-9_])"
        )
    return content.name


def twilio_request(
    *,
    api_base: str,
    account_sid: str,
    auth_token: str,
    sender: str,
    to: str,
    content: OutboundContent,
    message_id: str,
    status_callback: str,
) -> ProviderRequest:
    """The Programmable Messaging send request (form-encoded, HTTP Basic sid:token).

    `sender` goes out as the channel holds it ("whatsapp:+1..." for WhatsApp, "+1..." for SMS);
    `to` in the sender's channel: a plain "+55..." gets the sender's "whatsapp:" prefix, since
    Parley keeps a Twilio WhatsApp contact without it (channels/twilio.py) and Twilio refuses a
    From/To pair of two channels (21910). `status_callback` is normally
    `twilio_status_callback(public_url, message_id)`.
    Unsupported for a template that is not a Content SID, or whose parameters are not all text.
    """
    _require_base(api_base, "api_base")
    if not _ACCOUNT_SID.fullmatch(account_sid):
        raise ValueError("account_sid must be AC followed by 32 hex digits")
    _require_token(auth_token, "auth_token")
    _require_text(sender, "sender")
    _require_text(to, "to")
    _require_message_id(message_id)
    _require_base(status_callback, "status_callback")
    channel, colon, _ = sender.partition(":")
    if colon and ":" not in to:
        to = f"{channel}:{to}"
    fields: list[tuple[str, str]] = [("To", to), ("From", sender)]
    if isinstance(content, TextContent):
        fields.append(("Body", content.text))
    elif isinstance(content, TemplateContent):
        sid, variables = _twilio_template(content)
        fields.append(("ContentSid", sid))
        if variables:
            fields.append(("ContentVariables", orjson.dumps(variables).decode()))
    else:
        caption = None if isinstance(content, AudioContent) else content.caption
        if caption is not None:
            fields.append(("Body", caption))
        fields.append(("MediaUrl", content.link))
    fields.append(("StatusCallback", status_callback))
    credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
    return ProviderRequest(
        url=f"{api_base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json",
        headers={
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        body=urlencode(fields).encode(),
    )


def _twilio_template(content: TemplateContent) -> tuple[str, dict[str, str]]:
    """(ContentSid, ContentVariables) for a template, or Unsupported."""
    if not _CONTENT_SID.fullmatch(content.name):
        raise Unsupported(
            f"template {content.name!r} is not a Twilio Content SID (HX + 32 hex digits); Twilio "
            "sends WhatsApp templates by Content SID, so register the template in Twilio's "
            "Content API and send its SID as the name"
        )
    variables: dict[str, str] = {}
    position = 0
    for i, component in enumerate(content.components):
        parameters = component.get("parameters", [])
        if not isinstance(parameters, list):
            raise Unsupported(f"components[{i}].parameters must be a list")
        for j, parameter in enumerate(parameters):
            text = parameter.get("text") if isinstance(parameter, dict) else None
            if not isinstance(text, str) or parameter.get("type") != "text":
                raise Unsupported(
                    f"components[{i}].parameters[{j}]: only text parameters map to Twilio ContentVariables"
                )
            position += 1
            name = parameter.get("parameter_name")
            key = name if isinstance(name, str) and name else str(position)
            if key in variables:
                raise Unsupported(f"components[{i}].parameters[{j}]: variable {key!r} given twice")
            variables[key] = text
    return content.name, variables


CALLBACK_PARAM = "parley_message_id"


def twilio_status_callback(public_url: str, message_id: str) -> str:
    """public_url with `parley_message_id=<id>` added to its query (any previous one replaced).

    The id is percent-encoded (every reserved character), the existing query is kept byte for
    byte and the fragment dropped (never sent to a server). Twilio signs the URL it calls, query
    included, so the webhook route must check the signature against this same string.
    """
    _require_message_id(message_id)
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("public_url must be an absolute http(s) URL")
    kept = [p for p in parts.query.split("&") if p and unquote_plus(p.split("=", 1)[0]) != CALLBACK_PARAM]
    kept.append(f"{CALLBACK_PARAM}={quote(message_id, safe='')}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(kept), ""))


def _require_base(url: str, name: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{name} must be an absolute http(s) URL")


def _require_token(token: str, name: str) -> None:
    if not token or _CONTROL.search(token):
        raise ValueError(f"{name} must be non-empty, without spaces or control characters")


def _require_text(value: str, name: str) -> None:
    if not value or not value.isprintable():
        raise ValueError(f"{name} must be non-empty and printable")


def _require_message_id(message_id: str) -> None:
    if not message_id or not message_id.isprintable():
        raise ValueError("message_id must be non-empty and printable")


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

OutcomeKind = Literal["sent", "retry", "recipient_wait", "failed", "paused", "in_doubt"]


@dataclass(frozen=True)
class SendOutcome:
    """What one send attempt came to.

    sent: accepted, `provider_message_id` set. retry: not sent, try again later (throughput,
    provider trouble, no connection). recipient_wait: not sent, this recipient only is rate
    limited (other sends go on). failed: not sent and never will be as is (code, title say why).
    paused: nothing can be sent on this channel until an operator acts (usually: update the
    token). in_doubt: it may have been sent; do not resend blindly, wait for a status webhook
    (matched by Parley's message id) or an operator.
    """

    kind: OutcomeKind
    provider_message_id: str | None = None  # wamid / SM sid when sent
    code: str | None = None  # the provider's error code, as a string ("130429", "20429")
    title: str | None = None  # the provider's message / title
    retry_after: float | None = None  # seconds, when the provider said (retry, recipient_wait only)


MAX_TITLE = 1000

# Graph error codes, by what they mean for the send (see the table in the module docstring).
WA_THROTTLED = frozenset({4, 80007, 130429})
WA_TRANSIENT = frozenset({2, 131000, 131016})
WA_PAIR_LIMIT = 131056
WA_PAUSED = frozenset({0, 3, 10, 190, 131005, 131031, 131042, 368, *range(200, 300)})
WA_FAILED = frozenset(
    {100, 131008, 131009, 131026, 131030, 131047, 131048, 131051, 130497, *range(132000, 132070)}
)

TW_THROTTLED = frozenset({20429})
TW_PAUSED = frozenset({20003, 20403})
TW_FAILED = frozenset({21211, 21608, 21610, 21614, 63016})


def classify_whatsapp(
    status: int | None, body: bytes, retry_after: float | None, *, timed_out_after_send: bool
) -> SendOutcome:
    """The outcome of a Cloud API send from its HTTP status (None: no answer) and raw body."""
    early = _no_answer(status, timed_out_after_send)
    if early is not None:
        return early
    assert status is not None
    decoded = _json(body)
    if 200 <= status < 300:
        messages = decoded.get("messages") if isinstance(decoded, dict) else None
        first = messages[0] if isinstance(messages, list) and messages else None
        wamid = first.get("id") if isinstance(first, dict) else None
        if isinstance(wamid, str) and wamid:
            return SendOutcome("sent", provider_message_id=wamid)
        return SendOutcome("in_doubt", title=f"HTTP {status} without messages[0].id")
    error = decoded.get("error") if isinstance(decoded, dict) else None
    error = error if isinstance(error, dict) else {}
    code = _int_code(error.get("code"))
    title = _graph_title(error) or f"HTTP {status}"
    return _decide(
        status,
        code,
        title,
        _sane_wait(retry_after),
        throttled=WA_THROTTLED,
        transient=WA_TRANSIENT,
        paused=WA_PAUSED,
        failed=WA_FAILED,
        pair_limit=WA_PAIR_LIMIT,
    )


def classify_twilio(
    status: int | None, body: bytes, retry_after: float | None, *, timed_out_after_send: bool
) -> SendOutcome:
    """The outcome of a Twilio Messages create from its HTTP status (None: no answer) and raw body."""
    early = _no_answer(status, timed_out_after_send)
    if early is not None:
        return early
    assert status is not None
    decoded = _json(body)
    if 200 <= status < 300:
        sid = decoded.get("sid") if isinstance(decoded, dict) else None
        if isinstance(sid, str) and sid:
            return SendOutcome("sent", provider_message_id=sid)
        return SendOutcome("in_doubt", title=f"HTTP {status} without sid")
    error = decoded if isinstance(decoded, dict) else {}
    code = _int_code(error.get("code"))
    message = error.get("message")
    title = _short(message) if isinstance(message, str) and message else f"HTTP {status}"
    return _decide(
        status,
        code,
        title,
        _sane_wait(retry_after),
        throttled=TW_THROTTLED,
        transient=frozenset(),
        paused=TW_PAUSED,
        failed=TW_FAILED,
        pair_limit=None,
    )


def _no_answer(status: int | None, timed_out_after_send: bool) -> SendOutcome | None:
    if status is not None:
        return None
    if timed_out_after_send:
        return SendOutcome("in_doubt", title="no answer after the request was sent")
    return SendOutcome("retry", title="no connection: the request was not sent")


def _decide(
    status: int,
    code: int | None,
    title: str,
    wait: float | None,
    *,
    throttled: frozenset[int],
    transient: frozenset[int],
    paused: frozenset[int],
    failed: frozenset[int],
    pair_limit: int | None,
) -> SendOutcome:
    """Codes first (they are precise), then the HTTP status."""
    text = None if code is None else str(code)
    if code is not None:
        if code in paused:
            return SendOutcome("paused", code=text, title=title)
        if code == pair_limit:
            return SendOutcome("recipient_wait", code=text, title=title, retry_after=wait)
        if code in throttled or code in transient:
            return SendOutcome("retry", code=text, title=title, retry_after=wait)
        if code in failed:
            return SendOutcome("failed", code=text, title=title)
    if status == 401:
        return SendOutcome("paused", code=text, title=title)
    if status == 504:
        return SendOutcome("in_doubt", code=text, title=title)
    if status in (408, 429) or status >= 500:
        return SendOutcome("retry", code=text, title=title, retry_after=wait)
    return SendOutcome("failed", code=text, title=title)


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _int_code(raw: object) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    return None


def _graph_title(error: Mapping[str, Any]) -> str | None:
    """error.message, plus error_data.details when it adds something (Meta: the most telling part)."""
    message = error.get("message")
    data = error.get("error_data")
    details = data.get("details") if isinstance(data, dict) else None
    parts = [p for p in (message, details) if isinstance(p, str) and p]
    if len(parts) == 2 and parts[1] in parts[0]:
        parts = parts[:1]
    return _short(": ".join(parts)) if parts else None


def _short(text: str) -> str:
    return text if len(text) <= MAX_TITLE else text[: MAX_TITLE - 1] + "…"


def _sane_wait(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return float(seconds)


# ---------------------------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------------------------

JITTER = 0.2  # a jitter draw of j in [0, 1) lengthens a delay by j * 20%


def backoff(attempt: int, *, base: float, factor: float, cap: float, jitter: float) -> float:
    """Seconds to wait after `attempt` failed attempts (1 = the first): capped exponential.

    min(cap, base * factor ** (attempt - 1)) * (1 + 0.2 * jitter), so within [d, 1.2 d) of the
    capped delay d: the jitter is applied after the cap, or every lane at the cap would wake in
    step. `jitter` is a draw in [0, 1) made by the caller (random.random()).
    """
    if attempt < 1:
        raise ValueError("attempt counts failed attempts and starts at 1")
    if base < 0 or cap < 0 or factor < 1:
        raise ValueError("base and cap must be >= 0 and factor >= 1")
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be in [0, 1)")
    try:
        delay = min(cap, base * factor ** (attempt - 1))
    except OverflowError:
        delay = cap
    return delay * (1 + JITTER * jitter)


def next_wait(
    outcome: SendOutcome, attempt: int, *, base: float, factor: float, cap: float, jitter: float
) -> float | None:
    """Seconds before the next attempt of this message, or None when it is not to be retried.

    retry and recipient_wait: the backoff, or the provider's Retry-After when that is longer.
    Every other outcome: None (sent, failed, paused and in_doubt are not retried by timer).
    """
    if outcome.kind not in ("retry", "recipient_wait"):
        return None
    delay = backoff(attempt, base=base, factor=factor, cap=cap, jitter=jitter)
    return max(delay, outcome.retry_after) if outcome.retry_after is not None else delay


def contact_for(provider: str, to: str) -> str:
    """A `to` given to the API, as that provider's inbound messages name the contact (so a
    business-initiated message joins the thread the user's own messages are in): WhatsApp's
    wa_id has no "+" ("+55 11..." -> "5511..."); Twilio's From loses its "whatsapp:" prefix."""
    if provider == "whatsapp":
        return to.removeprefix("+")
    if provider == "twilio":
        return to.removeprefix("whatsapp:")
    return to
