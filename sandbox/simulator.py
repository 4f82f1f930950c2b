"""A provider simulator: the WhatsApp Cloud API and Twilio's Messages API as one aiohttp server.

It is a test double at the network boundary only. Parley's sender talks HTTP to it exactly as it
would to graph.facebook.com or api.twilio.com, and it posts signed status webhooks back to
Parley's real webhook routes. Nothing of Parley is imported except the signers' conventions.

What it imitates, and where the shapes come from (checked against the providers' docs):

* Graph send, ``POST /{version}/{phone_number_id}/messages`` with ``Authorization: Bearer``
  (developers.facebook.com/docs/whatsapp/cloud-api/reference/messages): body checks answer
  400/code 100; a wrong token 401/code 190, an expired one 401/190 subcode 463; an unknown
  number 400/code 100 subcode 33; success ``{"messaging_product", "contacts": [{"input",
  "wa_id"}], "messages": [{"id": "wamid...."}]}``. Error bodies follow Graph's error object
  (``message "(#code) title"``, type, code, error_subcode?, error_data {messaging_product,
  details}, fbtrace_id; /docs/whatsapp/cloud-api/support/error-codes).
* Limits (the error-code page; Meta's throughput page is summarised the same way by third-party
  guides): throughput per business number, 80 messages/s by default, refused with code 130429;
  the pair rate per (number, user), about one message every 6 s, refused with 131056. The burst
  of about 45 that is then paid back comes from Meta's pair-rate description as relayed in this
  task's brief (not found in the stored doc copies); both numbers are per-number settings.
  Meta's own table lists these throttling codes with HTTP 400 in places and 429 in others; the
  simulator answers 429 unless a number says otherwise (``throttle_http_status``). A sender
  must branch on ``error.code``, never on the HTTP status alone.
* Twilio create, ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, form-encoded, basic
  auth AccountSid:AuthToken (twilio.com/docs/messaging/api/message-resource): 201 with the
  Message resource (``sid`` SM/MM + 32 hex, ``status`` queued); errors as the 2010 API's JSON
  ``{"code", "message", "more_info", "status"}`` (twilio.com/docs/usage/twilios-response):
  20003 (401) bad credentials, 21604/21603/21619 missing To/From/Body, 21211 invalid To, 21910
  From and To of different channels (whatsapp:+1... to a plain +55...), 20429 over the
  per-sender rate. Real Twilio queues sends above a sender's MPS (10 MPS by default
  for WhatsApp senders) instead of refusing them; refusing with 20429 is the stricter double.
* Status webhooks: WhatsApp's envelope (object whatsapp_business_account, entry[].changes[]
  .value.statuses[] with id, status, timestamp, recipient_id, biz_opaque_callback_data,
  conversation, pricing, errors) signed ``X-Hub-Signature-256: sha256=HMAC-SHA256(app_secret,
  body)``; Twilio's form-encoded status callback (MessageSid, MessageStatus, AccountSid, From,
  To, ErrorCode, ...) to the message's StatusCallback, signed ``X-Twilio-Signature:
  base64(HMAC-SHA1(auth_token, url + sorted key+value))`` over that URL
  (twilio.com/docs/messaging/guides/track-outbound-message-status, /docs/usage/security).
  No callback is sent for the initial ``queued``, as Twilio documents.

Everything is configurable at runtime through ``/_sim/...`` (JSON) or the same-named methods of
`Simulator`; every accepted send is recorded with its monotonic time so tests can check limits
exactly (`Stats.max_in_any_second`). Run it alone with ``python -m sandbox.simulator``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox import shapes
from sandbox.limits import TokenBucket, WindowLimit, max_in_window

log = logging.getLogger("sandbox.simulator")

# Query parameters of a Twilio StatusCallback URL that may carry Parley's own message id.
MESSAGE_ID_PARAMS = ("parley_message_id", "message_id", "mid")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WhatsAppNumber(_Model):
    """A business phone number of the Cloud API; configuring it again replaces it (limits reset)."""

    phone_number_id: str = Field(pattern=r"^[0-9]{1,32}$")
    token: str = Field(min_length=1)
    app_secret: str = Field(min_length=1)
    display_phone_number: str = "15550000000"
    waba_id: str = "100000000000000"
    throughput: int = Field(80, ge=0)  # accepted sends in any 1 s window
    pair_burst: float = Field(45, ge=1)  # sends to one user before the pair rate bites
    pair_refill_s: float = Field(6.0, gt=0)  # then one more every this many seconds
    templates: list[str] | None = None  # names that exist; None: every name exists
    throttle_http_status: int = Field(429, ge=400, le=599)  # for 130429 and 131056


class TwilioAccount(_Model):
    """A Twilio account; configuring it again replaces it (limits reset)."""

    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: str = Field(min_length=1)
    sender_rate: int = Field(10, ge=0)  # accepted sends per sender (From) in any 1 s window
    status_callback: str | None = None  # used for messages sent without a StatusCallback


class Failure(_Model):
    """What the next matching send requests get instead of the normal answer.

    action: "error" answers http_status/body, or the provider's error body for `code`;
    "fail_async" accepts the send and then reports it failed (status webhook with `code`);
    "delay" waits latency_s then handles the send normally; "hang" never answers (the
    connection is dropped when failures are cleared or the simulator stops); "drop" closes the
    connection without an answer. With `process` (default: yes for drop, no for hang) the send
    is handled first, so it counts as accepted and gets its status webhooks: the "in doubt" case.
    """

    provider: Literal["whatsapp", "twilio"]
    action: Literal["error", "fail_async", "delay", "hang", "drop"] = "error"
    number: str | None = None  # phone_number_id or AccountSid; None: any
    recipient: str | None = None  # `to` (digits compared, whatsapp: prefix ignored); None: any
    times: int | None = Field(1, ge=1)  # None: until cleared
    code: int | None = None
    http_status: int | None = Field(None, ge=100, le=599)
    body: dict[str, Any] | None = None
    latency_s: float = Field(0.0, ge=0)  # waited before anything else, for every action
    process: bool | None = None


class WebhookSettings(_Model):
    """How status webhooks go back to Parley (applies to sends accepted after the change)."""

    enabled: bool = True
    first_delay_s: float = Field(0.02, ge=0)  # after acceptance, before the first status
    interval_s: float = Field(0.02, ge=0)  # between two statuses of one message
    read: bool = True  # report "read" after "delivered"
    order: Literal["natural", "reversed", "shuffled"] = "natural"
    duplicate: float = Field(0.0, ge=0, le=1)  # share of statuses posted twice
    attempts: int = Field(3, ge=1)  # tries per status when Parley fails or answers non-2xx
    retry_delay_s: float = Field(0.2, ge=0)


@dataclass
class Accepted:
    """A send the provider took: it exists at the provider whatever the client learnt."""

    provider: Literal["whatsapp", "twilio"]
    number: str  # phone_number_id, or the Twilio sender (From)
    account: str  # WABA id, or AccountSid
    recipient: str
    provider_message_id: str
    parley_message_id: str | None  # biz_opaque_callback_data, or from the StatusCallback query
    at: float  # unix time
    mono: float  # time.monotonic(), the clock the limiters use
    answered: bool = True  # False: dropped or hung, the client never saw the answer


@dataclass(frozen=True)
class Delivery:
    """One attempt to post a status webhook to Parley."""

    provider: str
    provider_message_id: str
    status: str
    url: str
    http_status: int | None
    error: str | None
    attempt: int


@dataclass(frozen=True)
class Stats:
    accepted: list[Accepted]
    max_in_any_second: dict[str, int]  # per number (phone_number_id, or Twilio From)
    per_recipient: dict[str, dict[str, int]]  # number -> recipient -> accepted sends
    rejected: dict[str, int]  # provider error code (or "http_<status>") -> refused sends
    deliveries: list[Delivery]

    def as_json(self, with_sends: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_sends:
            out.pop("accepted")
            out.pop("deliveries")
        out["accepted_count"] = len(self.accepted)
        return out


@dataclass
class _WaState:
    config: WhatsAppNumber
    window: WindowLimit
    pairs: dict[str, TokenBucket] = field(default_factory=dict)
    expired: bool = False


@dataclass
class _TwState:
    config: TwilioAccount
    senders: dict[str, WindowLimit] = field(default_factory=dict)


@dataclass
class _Rule:
    failure: Failure
    left: int | None


@dataclass(frozen=True)
class _Outcome:
    status: int
    body: dict[str, Any]
    accepted: Accepted | None = None


Poster = Callable[[str, int], Awaitable[bool]]  # (status, attempt) -> posted and answered 2xx


class Simulator:
    """The simulator server. ``async with Simulator(parley_base_url=...) as sim:`` starts it on
    ``sim.url``; point Parley's Graph base and Twilio API base at that URL."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        parley_base_url: str | None = None,
        *,
        seed: int | None = None,
        message_id_params: tuple[str, ...] = MESSAGE_ID_PARAMS,
        whatsapp_webhook_path: str = "/webhooks/whatsapp",
    ) -> None:
        self.host = host
        self.port = port
        self.parley_base_url = parley_base_url.rstrip("/") if parley_base_url else None
        self.message_id_params = message_id_params
        self.whatsapp_webhook_path = whatsapp_webhook_path
        self._rng = random.Random(seed)
        self._wa: dict[str, _WaState] = {}
        self._tw: dict[str, _TwState] = {}
        self._rules: list[_Rule] = []
        self._webhooks = WebhookSettings()
        self._accepted: list[Accepted] = []
        self._rejected: Counter[str] = Counter()
        self._deliveries: list[Delivery] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL of both APIs and of the control API."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = self._runner.addresses[0][1]
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        log.info("provider simulator listening on %s", self.url)

    async def stop(self) -> None:
        self._release.set()  # hung requests end (by dropping their connection)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(r"/{version:v[0-9]+\.[0-9]+}/{phone_number_id}/messages", self._graph_send)
        app.router.add_post("/2010-04-01/Accounts/{account_sid}/Messages.json", self._twilio_send)
        app.router.add_post("/_sim/whatsapp/numbers", self._ctl_whatsapp_number)
        app.router.add_post("/_sim/whatsapp/numbers/{id}/token/expire", self._ctl_expire)
        app.router.add_post("/_sim/whatsapp/numbers/{id}/token/renew", self._ctl_renew)
        app.router.add_post("/_sim/twilio/accounts", self._ctl_twilio_account)
        app.router.add_post("/_sim/failures", self._ctl_inject)
        app.router.add_delete("/_sim/failures", self._ctl_clear_failures)
        app.router.add_put("/_sim/webhooks", self._ctl_webhooks)
        app.router.add_get("/_sim/stats", self._ctl_stats)
        app.router.add_post("/_sim/reset", self._ctl_reset)
        return app

    # ---- control (the same operations as the /_sim routes) ---------------------------------

    def configure_whatsapp(self, number: WhatsAppNumber) -> None:
        """Add or replace a business number (its limiters start afresh)."""
        self._wa[number.phone_number_id] = _WaState(number, WindowLimit(number.throughput))

    def configure_twilio(self, account: TwilioAccount) -> None:
        """Add or replace a Twilio account (its per-sender limiters start afresh)."""
        self._tw[account.account_sid] = _TwState(account)

    def expire_token(self, phone_number_id: str) -> None:
        """From now on the number's token is refused with 190 (subcode 463) until renewed."""
        self._wa_state(phone_number_id).expired = True

    def renew_token(self, phone_number_id: str, token: str) -> None:
        """A new valid token; the old one is refused from now on."""
        state = self._wa_state(phone_number_id)
        state.config = state.config.model_copy(update={"token": token})
        state.expired = False

    def inject(self, failure: Failure) -> None:
        """Queue a failure rule; rules are tried in the order they were added."""
        self._rules.append(_Rule(failure, failure.times))

    def clear_failures(self) -> None:
        """Drop every rule and let hung requests end."""
        self._rules.clear()
        self._release.set()
        self._release = asyncio.Event()

    def configure_webhooks(self, settings: WebhookSettings) -> None:
        self._webhooks = settings

    def stats(self) -> Stats:
        by_number: dict[str, list[float]] = {}
        per_recipient: dict[str, Counter[str]] = {}
        for sent in self._accepted:
            by_number.setdefault(sent.number, []).append(sent.mono)
            per_recipient.setdefault(sent.number, Counter())[sent.recipient] += 1
        return Stats(
            accepted=list(self._accepted),
            max_in_any_second={n: max_in_window(times) for n, times in by_number.items()},
            per_recipient={n: dict(c) for n, c in per_recipient.items()},
            rejected=dict(self._rejected),
            deliveries=list(self._deliveries),
        )

    def reset(self) -> None:
        """Forget sends, rejections, deliveries and failure rules; refill every limiter.
        Numbers, accounts and webhook settings stay."""
        self.clear_failures()
        self._accepted.clear()
        self._rejected.clear()
        self._deliveries.clear()
        for wa in self._wa.values():
            self.configure_whatsapp(wa.config)
        for tw in self._tw.values():
            self.configure_twilio(tw.config)

    async def drain_webhooks(self) -> None:
        """Wait until every status webhook scheduled so far has been posted (or given up)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _wa_state(self, phone_number_id: str) -> _WaState:
        try:
            return self._wa[phone_number_id]
        except KeyError:
            raise LookupError(f"no WhatsApp number {phone_number_id!r} is configured") from None

    # ---- WhatsApp Cloud API ----------------------------------------------------------------

    async def _graph_send(self, request: web.Request) -> web.StreamResponse:
        phone_number_id = request.match_info["phone_number_id"]
        raw = await request.read()
        state = self._wa.get(phone_number_id)
        if state is None:
            return self._refuse_wa(
                100,
                subcode=33,
                message=f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, "
                "cannot be loaded due to missing permissions, or does not support this operation",
            )
        refused = self._check_bearer(state, request.headers.get("Authorization"))
        if refused is not None:
            return refused
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return self._refuse_wa(100, details="The request body is not valid JSON")
        problem = shapes.wa_body_problem(body, state.config.templates)
        if problem is not None:
            code, details = problem
            return self._refuse_wa(code, details=details)
        failure = self._take_failure("whatsapp", phone_number_id, body["to"])
        return await self._handle(request, failure, lambda fail: self._wa_admit(state, body, fail))

    def _check_bearer(self, state: _WaState, header: str | None) -> web.Response | None:
        given = header.removeprefix("Bearer ").strip() if header and header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), state.config.token.encode()):
            return self._refuse_wa(
                190,
                message="Invalid OAuth access token - Cannot parse access token",
                details="The access token is not one this phone number accepts",
            )
        if state.expired:
            return self._refuse_wa(
                190,
                subcode=463,
                message="Error validating access token: Session has expired on "
                + time.strftime("%A, %d-%b-%y %H:%M:%S PDT", time.gmtime()),
            )
        return None

    def _wa_admit(self, state: _WaState, body: dict[str, Any], fail_code: int | None) -> _Outcome:
        """Apply the limits and, if they allow it, accept the send and schedule its webhooks."""
        now = time.monotonic()
        to = body["to"]
        pair = state.pairs.get(shapes.wa_id(to))
        if pair is None:
            cfg = state.config
            pair = state.pairs[shapes.wa_id(to)] = TokenBucket(cfg.pair_burst, 1 / cfg.pair_refill_s, now)
        if not state.window.allows(now):
            return self._refusal(shapes.graph_error(130429), state.config.throttle_http_status)
        if not pair.allows(now):
            return self._refusal(shapes.graph_error(131056), state.config.throttle_http_status)
        state.window.take(now)
        pair.take(now)
        opaque = body.get("biz_opaque_callback_data")
        sent = Accepted(
            provider="whatsapp",
            number=state.config.phone_number_id,
            account=state.config.waba_id,
            recipient=to,
            provider_message_id=shapes.wamid(),
            parley_message_id=opaque,
            at=time.time(),
            mono=now,
        )
        self._accepted.append(sent)
        category = "marketing" if body.get("type") == "template" else "service"
        statuses = ["failed"] if fail_code is not None else self._natural_statuses(whatsapp=True)

        async def post(status: str, attempt: int) -> bool:
            return await self._post_wa_status(state, sent, status, opaque, category, fail_code, attempt)

        if self.parley_base_url is not None:
            self._schedule(sent, statuses, post)
        return _Outcome(200, shapes.wa_send_answer(to, sent.provider_message_id), sent)

    async def _post_wa_status(
        self,
        state: _WaState,
        sent: Accepted,
        status: str,
        opaque: str | None,
        category: str,
        fail_code: int | None,
        attempt: int,
    ) -> bool:
        item = shapes.wa_status(
            message_id=sent.provider_message_id,
            status=status,
            timestamp=int(time.time()),
            recipient=sent.recipient,
            opaque=opaque,
            category=category,
            error_code=fail_code,
        )
        envelope = shapes.wa_envelope(
            waba_id=state.config.waba_id,
            phone_number_id=state.config.phone_number_id,
            display_phone_number=state.config.display_phone_number,
            statuses=[item],
        )
        raw = json.dumps(envelope).encode()
        digest = hmac.new(state.config.app_secret.encode(), raw, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Hub-Signature-256": "sha256=" + digest}
        url = f"{self.parley_base_url}{self.whatsapp_webhook_path}"
        return await self._post(sent, status, attempt, url, raw, headers)

    def _refuse_wa(
        self, code: int, *, details: str | None = None, subcode: int | None = None, message: str | None = None
    ) -> web.Response:
        outcome = self._refusal(shapes.graph_error(code, details=details, subcode=subcode, message=message))
        return web.json_response(outcome.body, status=outcome.status)

    # ---- Twilio Messages API ---------------------------------------------------------------

    async def _twilio_send(self, request: web.Request) -> web.StreamResponse:
        account_sid = request.match_info["account_sid"]
        raw = await request.read()
        state = self._tw.get(account_sid)
        if state is None or not _basic_auth_ok(request.headers.get("Authorization"), state.config):
            return self._refuse_twilio(20003)
        try:
            pairs = parse_qsl(raw.decode(), keep_blank_values=True)
        except (ValueError, UnicodeDecodeError):
            return self._refuse_twilio(21619, "The request body is not a valid form")
        form = dict(pairs)
        media = [v for k, v in pairs if k == "MediaUrl"]
        problem = shapes.twilio_form_problem(form, media)
        if problem is not None:
            return self._refuse_twilio(problem)
        failure = self._take_failure("twilio", account_sid, form["To"])
        return await self._handle(request, failure, lambda fail: self._tw_admit(state, form, media, fail))

    def _tw_admit(
        self, state: _TwState, form: dict[str, str], media: list[str], fail_code: int | None
    ) -> _Outcome:
        now = time.monotonic()
        sender, to = form["From"], form["To"]
        window = state.senders.setdefault(sender, WindowLimit(state.config.sender_rate))
        if not window.allows(now):
            return self._refusal(shapes.twilio_error(20429))
        window.take(now)
        callback = form.get("StatusCallback") or state.config.status_callback
        sent = Accepted(
            provider="twilio",
            number=sender,
            account=state.config.account_sid,
            recipient=to,
            provider_message_id=shapes.twilio_sid(media=bool(media)),
            parley_message_id=self._parley_id_from(callback),
            at=time.time(),
            mono=now,
        )
        self._accepted.append(sent)
        whatsapp = to.startswith("whatsapp:")
        if fail_code is None:
            statuses = self._natural_statuses(whatsapp=whatsapp)
        else:
            statuses = ["failed"]

        async def post(status: str, attempt: int) -> bool:
            assert callback is not None
            return await self._post_twilio_status(state, sent, status, callback, fail_code, attempt)

        if callback:
            self._schedule(sent, statuses, post)
        answer = shapes.twilio_message(
            sid=sent.provider_message_id,
            account_sid=state.config.account_sid,
            to=to,
            sender=sender,
            body=form.get("Body", ""),
            num_media=len(media),
            now=sent.at,
        )
        return _Outcome(201, answer, sent)

    async def _post_twilio_status(
        self, state: _TwState, sent: Accepted, status: str, callback: str, fail_code: int | None, attempt: int
    ) -> bool:
        form = shapes.twilio_status_form(
            sid=sent.provider_message_id,
            account_sid=state.config.account_sid,
            to=sent.recipient,
            sender=sent.number,
            status=status,
            error_code=fail_code if status == "failed" else None,
        )
        signed = callback + "".join(key + form[key] for key in sorted(form))
        digest = hmac.new(state.config.auth_token.encode(), signed.encode(), hashlib.sha1).digest()
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": base64.b64encode(digest).decode(),
        }
        target = self._reachable(callback)
        return await self._post(sent, status, attempt, target, urlencode(form).encode(), headers)

    def _parley_id_from(self, callback: str | None) -> str | None:
        if not callback:
            return None
        query = parse_qs(urlsplit(callback).query)
        for name in self.message_id_params:
            if query.get(name):
                return query[name][0]
        return None

    def _reachable(self, callback: str) -> str:
        """Where to post a callback: its path and query on parley_base_url when one is set (the
        StatusCallback usually names Parley's public URL), else the URL itself. The signature
        always covers the StatusCallback as given, as Twilio signs the URL it was told."""
        if self.parley_base_url is None:
            return callback
        base = urlsplit(self.parley_base_url)
        parts = urlsplit(callback)
        return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))

    def _refuse_twilio(self, code: int, message: str | None = None) -> web.Response:
        outcome = self._refusal(shapes.twilio_error(code, message))
        return web.json_response(outcome.body, status=outcome.status)

    # ---- shared: failures, answers, webhooks -----------------------------------------------

    def _take_failure(self, provider: str, number: str, to: str) -> Failure | None:
        """The first rule matching this request, counted down (and dropped when used up)."""
        for rule in self._rules:
            f = rule.failure
            if f.provider != provider or (f.number is not None and f.number != number):
                continue
            if f.recipient is not None and shapes.wa_id(f.recipient) != shapes.wa_id(to):
                continue
            if rule.left is not None:
                rule.left -= 1
                if rule.left == 0:
                    self._rules.remove(rule)
            return f
        return None

    async def _handle(
        self,
        request: web.Request,
        failure: Failure | None,
        admit: Callable[[int | None], _Outcome],
    ) -> web.StreamResponse:
        """Run a send through its failure rule (if any) and answer it."""
        if failure is None:
            return _respond(admit(None))
        if failure.latency_s:
            await asyncio.sleep(failure.latency_s)  # the configured provider latency
        if failure.action == "delay":
            return _respond(admit(None))
        if failure.action == "error":
            return self._injected_error(failure)
        if failure.action == "fail_async":
            default = 131026 if failure.provider == "whatsapp" else 63016
            return _respond(admit(failure.code if failure.code is not None else default))
        process = failure.process if failure.process is not None else failure.action == "drop"
        outcome = admit(None) if process else None
        if outcome is not None and outcome.accepted is not None:
            outcome.accepted.answered = False
        if failure.action == "hang":
            await self._release.wait()
        return _drop(request)

    def _injected_error(self, failure: Failure) -> web.Response:
        if failure.body is not None:
            status = failure.http_status or 500
            self._rejected[str(failure.code) if failure.code is not None else f"http_{status}"] += 1
            return web.json_response(failure.body, status=status)
        if failure.code is None:
            status = failure.http_status or 500
            self._rejected[f"http_{status}"] += 1
            return web.Response(status=status, text="injected failure")
        if failure.provider == "whatsapp":
            outcome = self._refusal(shapes.graph_error(failure.code), failure.http_status)
        else:
            outcome = self._refusal(shapes.twilio_error(failure.code), failure.http_status)
        return web.json_response(outcome.body, status=outcome.status)

    def _refusal(self, error: tuple[int, dict[str, Any]], status: int | None = None) -> _Outcome:
        """Count a refused send by its provider code and build its answer."""
        default_status, body = error
        code = body["error"]["code"] if "error" in body else body["code"]
        self._rejected[str(code)] += 1
        return _Outcome(status or default_status, body)

    def _natural_statuses(self, whatsapp: bool) -> list[str]:
        statuses = ["sent", "delivered"]
        if self._webhooks.read and whatsapp:
            statuses.append("read")
        return statuses

    def _schedule(self, sent: Accepted, statuses: list[str], post: Poster) -> None:
        settings = self._webhooks
        if not settings.enabled:
            return
        if settings.order == "reversed":
            statuses = statuses[::-1]
        elif settings.order == "shuffled":
            self._rng.shuffle(statuses)
        sequence: list[str] = []
        for status in statuses:
            sequence.append(status)
            if self._rng.random() < settings.duplicate:
                sequence.append(status)
        task = asyncio.create_task(self._deliver(sequence, settings, post))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, sequence: list[str], settings: WebhookSettings, post: Poster) -> None:
        await asyncio.sleep(settings.first_delay_s)  # the configured delay, not a synchronisation
        for i, status in enumerate(sequence):
            if i:
                await asyncio.sleep(settings.interval_s)
            for attempt in range(1, settings.attempts + 1):
                if attempt > 1:
                    await asyncio.sleep(settings.retry_delay_s * 2 ** (attempt - 2))
                if await post(status, attempt):
                    break

    async def _post(
        self, sent: Accepted, status: str, attempt: int, url: str, raw: bytes, headers: dict[str, str]
    ) -> bool:
        """Post one status webhook and record the attempt; True when Parley answered 2xx."""
        assert self._client is not None, "the simulator is not started"
        http_status: int | None = None
        error: str | None = None
        try:
            async with self._client.post(url, data=raw, headers=headers) as response:
                http_status = response.status
                if http_status >= 300:
                    error = (await response.text())[:200]
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            log.warning("status webhook %s of %s to %s: %s", status, sent.provider_message_id, url, error)
        self._deliveries.append(
            Delivery(sent.provider, sent.provider_message_id, status, url, http_status, error, attempt)
        )
        return error is None

    # ---- control routes --------------------------------------------------------------------

    async def _ctl_whatsapp_number(self, request: web.Request) -> web.Response:
        number = await _parsed(request, WhatsAppNumber)
        self.configure_whatsapp(number)
        return web.json_response({"configured": number.phone_number_id})

    async def _ctl_expire(self, request: web.Request) -> web.Response:
        try:
            self.expire_token(request.match_info["id"])
        except LookupError as exc:
            return _ctl_error(404, str(exc))
        return web.json_response({"expired": True})

    async def _ctl_renew(self, request: web.Request) -> web.Response:
        renewal = await _parsed(request, _Renewal)
        try:
            self.renew_token(request.match_info["id"], renewal.token)
        except LookupError as exc:
            return _ctl_error(404, str(exc))
        return web.json_response({"expired": False})

    async def _ctl_twilio_account(self, request: web.Request) -> web.Response:
        account = await _parsed(request, TwilioAccount)
        self.configure_twilio(account)
        return web.json_response({"configured": account.account_sid})

    async def _ctl_inject(self, request: web.Request) -> web.Response:
        self.inject(await _parsed(request, Failure))
        return web.json_response({"rules": len(self._rules)}, status=201)

    async def _ctl_clear_failures(self, request: web.Request) -> web.Response:
        self.clear_failures()
        return web.json_response({"rules": 0})

    async def _ctl_webhooks(self, request: web.Request) -> web.Response:
        self.configure_webhooks(await _parsed(request, WebhookSettings))
        return web.json_response(self._webhooks.model_dump())

    async def _ctl_stats(self, request: web.Request) -> web.Response:
        with_sends = request.query.get("sends", "1") not in ("0", "false")
        return web.json_response(self.stats().as_json(with_sends))

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})


M = TypeVar("M", bound=BaseModel)


class _Renewal(_Model):
    token: str = Field(min_length=1)


async def _parsed(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": exc.errors(include_url=False, include_context=False)}),
            content_type="application/json",
        ) from None


def _ctl_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _respond(outcome: _Outcome) -> web.Response:
    return web.json_response(outcome.body, status=outcome.status)


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer: the client sees a disconnect, never a status."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp finds the transport closed and writes nothing of this response.
    return web.Response(status=204)


def _basic_auth_ok(header: str | None, account: TwilioAccount) -> bool:
    """Whether an Authorization header is Basic AccountSid:AuthToken of this account."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        login, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(login.encode(), account.account_sid.encode()) and hmac.compare_digest(
        password.encode(), account.auth_token.encode()
    )


# ---- command line ------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.simulator", description="WhatsApp Cloud API and Twilio simulator"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--parley", default=None, help="Parley's base URL for status webhooks")
    parser.add_argument(
        "--whatsapp", action="append", default=[], metavar="ID:TOKEN:APP_SECRET", help="a business number"
    )
    parser.add_argument("--twilio", action="append", default=[], metavar="SID:AUTH_TOKEN", help="an account")
    parser.add_argument("--seed", type=int, default=None)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    sim = Simulator(args.host, args.port, args.parley, seed=args.seed)
    for spec in args.whatsapp:
        number_id, token, secret = spec.split(":", 2)
        sim.configure_whatsapp(WhatsAppNumber(phone_number_id=number_id, token=token, app_secret=secret))
    for spec in args.twilio:
        sid, auth_token = spec.split(":", 1)
        sim.configure_twilio(TwilioAccount(account_sid=sid, auth_token=auth_token))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        print(f"provider simulator on {sim.url} (control API under {sim.url}/_sim/)", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
