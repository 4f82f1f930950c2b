"""The API described as OpenAPI 3.1, served at /openapi.json, and a page reading it at /docs.

Every route of the app has an entry in OPERATIONS (a unit test checks both ways), so a new route
is documented or the suite fails. Request bodies are the handlers' own pydantic models, turned
into JSON Schema by pydantic (2020-12, which OpenAPI 3.1 uses as is); responses are described with
the fields every answer has, leaving room for more (additionalProperties), and every status code a
handler can answer with is listed: the schemathesis run of the integration tests
(tests/integration/test_openapi.py) fails on a status code or body the document does not allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from api.admin import ACCEPT_IN, CLOSE_IN
from api.channels import CHANNEL_PATCH
from api.messages import CHANNEL_SEND_IN
from api.pause import PAUSE_IN
from api.schedules import MAX_BATCH, ResultIn, ScheduleIn
from api.webhook_endpoints import ENDPOINT_IN, ENDPOINT_PATCH, REPLAY_IN
from api.whatif import WHATIF_IN
from channels.config import CHANNEL_IN, GenericWebhook
from channels.outbound import OUTBOUND_CONTENT
from domain.schedules import KEY_PATTERN

routes = web.RouteTableDef()

Schema = dict[str, Any]
_MODELS: dict[str, TypeAdapter[Any]] = {}  # component name -> adapter, filled by _model()


def _model(name: str, adapter: TypeAdapter[Any] | type[BaseModel]) -> Schema:
    """A reference to a request model, registered as a component."""
    _MODELS[name] = adapter if isinstance(adapter, TypeAdapter) else TypeAdapter(adapter)
    return {"$ref": f"#/components/schemas/{name}"}


def obj(*required: str, **props: Schema) -> Schema:
    """An object with these fields always present (any others allowed)."""
    return {"type": "object", "required": list(required), "properties": props}


def _operation_id(method: str, path: str) -> str:
    return f"{method.lower()}{path}".replace("/", "_").replace("{", "").replace("}", "")


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
NSTR: Schema = {"type": ["string", "null"]}
ITEMS: Schema = obj("items", items={"type": "array", "items": {"type": "object"}})
ERROR: Schema = {"$ref": "#/components/schemas/Error"}

CONVERSATION = obj("id", "channel_id", "contact_id", "state", "version", id=STR, state=STR, version=INT)
PAGE = obj("items", "next_cursor", items=ITEMS["properties"]["items"], next_cursor=NSTR)
CHANNEL = obj("id", "provider", "created_at", id=STR, provider=STR, created_at=STR)
ACCEPTED = obj("accepted", accepted=STR)
QUEUED = obj("id", "status", id=STR, status=STR)
SCHEDULE = obj("key", "status", "version", key=STR, status=STR, version=INT)
ENDPOINT = obj("id", "url", "events", "enabled", id=STR, url=STR, events={"type": "array"}, enabled=BOOL)
CREATED_ENDPOINT = obj("id", "url", "events", "secret", id=STR, secret=STR)
DELIVERY = obj("id", "status", "attempts", id=INT, status=STR, attempts=INT)
HEALTH = obj("status", status=STR)
WHATIF_JOB = obj("id", "status", id=STR, status=STR)
PAUSED = obj("paused", paused={"type": "object", "additionalProperties": STR})
COUNTS: Schema = {"type": "object", "additionalProperties": INT}
NINT: Schema = {"type": ["integer", "null"]}
NNUM: Schema = {"type": ["number", "null"]}
MINUTES: Schema = {"type": "array", "items": INT, "minItems": 60, "maxItems": 60}
OVERVIEW = obj(
    "generated_at",
    "cap",
    "conversations",
    "timers",
    "dead_letters",
    "outbound",
    "webhooks",
    "schedules",
    "lag",
    "lag_error",
    "events",
    "paused",
    generated_at=STR,
    paused={"type": "object", "additionalProperties": obj("since", "reason", since=STR, reason=STR)},
    cap=INT,
    conversations=obj(
        "open_by_state",
        "open",
        "closed_last_24h",
        "close_reasons_last_24h",
        "per_minute",
        open_by_state=COUNTS,
        open=INT,
        closed_last_24h=INT,
        close_reasons_last_24h=COUNTS,
        per_minute=obj("opened", "closed", opened=MINUTES, closed=MINUTES),
    ),
    timers=obj("overdue", "next_minute", "next_hour", overdue=INT, next_minute=INT, next_hour=INT),
    dead_letters=obj(
        "not_retried",
        "newest",
        not_retried=INT,
        newest={
            "oneOf": [
                {"type": "null"},
                obj(
                    "id",
                    "failed_at",
                    "source_topic",
                    "error",
                    id=INT,
                    failed_at=STR,
                    source_topic=STR,
                    error=STR,
                ),
            ]
        },
    ),
    outbound=obj("queued", "sending", "failed", queued=INT, sending=INT, failed=INT),
    webhooks=obj(
        "pending",
        "endpoints",
        pending=INT,
        endpoints={
            "type": "array",
            "items": obj(
                "id",
                "url",
                "enabled",
                "failed",
                id=STR,
                url=STR,
                enabled=BOOL,
                failed=INT,
                failing_since=NSTR,
            ),
        },
    ),
    schedules=COUNTS,
    lag={
        "type": ["object", "null"],
        "additionalProperties": obj("lag", "partitions", lag=INT, partitions=INT, uncommitted=INT),
    },
    lag_error=NSTR,
    events=obj(
        "topic",
        "in_per_s",
        "applied_per_s",
        "series",
        topic=STR,
        in_per_s=NNUM,
        applied_per_s=NNUM,
        series={
            "type": "array",
            "items": obj(
                "at",
                "in_per_s",
                "applied_per_s",
                "lag",
                at=STR,
                in_per_s={"type": "number"},
                applied_per_s={"type": "number"},
                lag=INT,
            ),
        },
    ),
)
READY = obj("ready", "checks", ready=BOOL, checks={"type": "object"})


class BatchItem(ScheduleIn):
    """One item of POST /v1/schedules:batch: a PUT body and its key (documentation only: the
    route answers each item on its own, 422 for a bad one, and the others still go)."""

    key: str = Field(pattern=f"^{KEY_PATTERN.pattern}$")


class BatchIn(BaseModel):
    """POST /v1/schedules:batch."""

    model_config = ConfigDict(extra="forbid")

    items: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH)


KEY = {"type": "string", "pattern": f"^{KEY_PATTERN.pattern}$"}
UUID = {"type": "string", "format": "uuid"}


@dataclass(frozen=True)
class Op:
    """One operation: what it does, its body, what it answers, and where its parameters are."""

    summary: str
    ok: dict[int, Schema]  # success codes -> body (None-like {} for no body)
    errors: tuple[int, ...] = ()  # besides 401 on /v1 routes
    body: Schema | None = None
    query: dict[str, Schema] = field(default_factory=dict)
    headers: dict[str, Schema] = field(default_factory=dict)
    content: str = "application/json"  # of the request body
    answers: str = "application/json"  # of a successful answer
    tag: str = ""
    ids: Schema = field(default_factory=lambda: {"type": "string"})  # the path parameters'


IDEM = {"Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": 255}}
CURSOR = {"limit": {"type": "integer", "minimum": 1, "maximum": 500}, "cursor": STR}
BODY_ERRORS = (400, 413, 422)

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/healthz"): Op("The process is up", {200: HEALTH}, tag="health"),
    ("GET", "/readyz"): Op(
        "Kafka, Postgres and the worker group ready (`?worker=false` leaves the worker out)",
        {200: READY},
        errors=(503,),
        query={"worker": {"type": "string", "enum": ["true", "false"]}},
        tag="health",
    ),
    ("GET", "/"): Op("The operator console", {200: {}}, answers="text/html", tag="console"),
    ("GET", "/console.js"): Op(
        "The console's script (no token: it holds no data)",
        {200: {}},
        answers="text/javascript",
        tag="console",
    ),
    ("GET", "/v1/overview"): Op(
        "The console's overview: counts, the last hour per minute, lag and events/s, failures",
        {200: OVERVIEW},
        errors=(503,),
        tag="console",
    ),
    ("GET", "/metrics"): Op(
        "Prometheus metrics of this API process (requests, latency, produce latency, webhook rejections)",
        {200: STR},
        answers="text/plain",
        tag="health",
    ),
    ("GET", "/openapi.json"): Op("This document", {200: {"type": "object"}}, tag="docs"),
    ("GET", "/docs"): Op("This document as a page", {200: {}}, answers="text/html", tag="docs"),
    # what-if
    ("POST", "/v1/whatif"): Op(
        "Replay the retained log under the current and a changed policy (a job in this API process)",
        {202: WHATIF_JOB},
        errors=(*BODY_ERRORS, 429),
        body=_model("WhatIfIn", WHATIF_IN),
        tag="what-if",
    ),
    ("GET", "/v1/whatif/{id}"): Op(
        "A what-if job's progress, and its comparison once done",
        {200: WHATIF_JOB},
        errors=(404,),
        tag="what-if",
    ),
    # the emergency switch
    ("POST", "/v1/admin/pause"): Op(
        "Pause the lifecycle agent, the sender, the webhooks or all, on every worker, until resumed",
        {200: PAUSED},
        errors=BODY_ERRORS,
        body=_model("PauseIn", PAUSE_IN),
        tag="operations",
    ),
    ("POST", "/v1/admin/resume"): Op(
        "Resume a paused part",
        {200: PAUSED},
        errors=BODY_ERRORS,
        body=_model("PauseIn", PAUSE_IN),
        tag="operations",
    ),
    ("GET", "/v1/admin/paused"): Op("What is paused, and since when", {200: PAUSED}, tag="operations"),
    # conversations
    ("GET", "/v1/conversations"): Op(
        "A page of conversations, newest first",
        {200: PAGE},
        errors=(400,),
        query={"contact": STR, "channel": STR, "state": STR, "reason": STR, **CURSOR},
        tag="conversations",
    ),
    ("GET", "/v1/conversations/{id}"): Op(
        "One conversation", {200: CONVERSATION}, errors=(404,), tag="conversations", ids=UUID
    ),
    ("GET", "/v1/conversations/{id}/messages"): Op(
        "A conversation's messages in order", {200: ITEMS}, errors=(404,), tag="conversations", ids=UUID
    ),
    ("GET", "/v1/conversations/{id}/events"): Op(
        "A conversation's audit log", {200: ITEMS}, errors=(404,), tag="conversations", ids=UUID
    ),
    ("POST", "/v1/conversations/{id}/close"): Op(
        "Close a conversation (applied in order by the worker)",
        {202: ACCEPTED},
        errors=(*BODY_ERRORS, 404, 503),
        body=_model("CloseIn", CLOSE_IN),
        headers=IDEM,
        tag="conversations",
        ids=UUID,
    ),
    ("POST", "/v1/conversations/{id}/accept"): Op(
        "An agent accepts a conversation",
        {202: ACCEPTED},
        errors=(*BODY_ERRORS, 404, 503),
        body=_model("AcceptIn", ACCEPT_IN),
        headers=IDEM,
        tag="conversations",
        ids=UUID,
    ),
    ("POST", "/v1/conversations/{id}/messages"): Op(
        "Send a message in a conversation (or record one sent elsewhere: `already_sent`)",
        {202: QUEUED},
        errors=(*BODY_ERRORS, 404, 409, 503),
        body=_model("OutboundContent", OUTBOUND_CONTENT),
        headers=IDEM,
        tag="messages",
        ids=UUID,
    ),
    ("POST", "/v1/channels/{id}/messages"): Op(
        "Send a business-initiated message to `to` on a channel",
        {202: QUEUED},
        errors=(*BODY_ERRORS, 404, 409, 503),
        body=_model("ChannelSendIn", CHANNEL_SEND_IN),
        headers=IDEM,
        tag="messages",
    ),
    ("GET", "/v1/messages/{id}"): Op(
        "One message and its send", {200: {"type": "object"}}, (404,), tag="messages"
    ),
    ("POST", "/v1/messages/{id}/retry"): Op(
        "Queue a failed send again", {202: {"type": "object"}}, errors=(404, 409), tag="messages"
    ),
    # channels
    ("POST", "/v1/channels"): Op(
        "Register a channel (its secrets are sealed, never shown again)",
        {201: CHANNEL},
        errors=(*BODY_ERRORS, 409),
        body=_model("ChannelIn", CHANNEL_IN),
        tag="channels",
    ),
    ("GET", "/v1/channels"): Op("Every channel, without secrets", {200: ITEMS}, tag="channels"),
    ("GET", "/v1/channels/{id}"): Op("One channel, without secrets", {200: CHANNEL}, (404,), tag="channels"),
    ("PATCH", "/v1/channels/{id}"): Op(
        "Rotate a channel's secrets",
        {200: CHANNEL},
        errors=(*BODY_ERRORS, 404),
        body=_model("ChannelPatch", CHANNEL_PATCH),
        tag="channels",
    ),
    ("DELETE", "/v1/channels/{id}"): Op("Delete a channel", {204: {}}, errors=(404,), tag="channels"),
    # dead letters
    ("GET", "/v1/dead-letters"): Op(
        "Dead letters, newest first",
        {
            200: obj(
                "items", "next_before", items={"type": "array"}, next_before={"type": ["integer", "null"]}
            )
        },
        errors=(400,),
        query={"limit": CURSOR["limit"], "before": INT},
        tag="dead letters",
    ),
    ("POST", "/v1/dead-letters/{id}/retry"): Op(
        "Put a dead letter back on its topic",
        {202: obj("retried", "events", retried=INT, events=INT)},
        errors=(400, 404, 409, 503),
        tag="dead letters",
    ),
    # provider webhooks
    ("GET", "/webhooks/whatsapp"): Op(
        "Meta's verification handshake",
        {200: {}},
        errors=(400, 403),
        query={"hub.mode": STR, "hub.verify_token": STR, "hub.challenge": STR},
        answers="text/plain",
        tag="provider webhooks",
    ),
    ("POST", "/webhooks/whatsapp"): Op(
        "WhatsApp Cloud API notifications (X-Hub-Signature-256)",
        {200: {"type": "object"}},
        errors=(*BODY_ERRORS, 401, 503),
        body={"type": "object"},
        tag="provider webhooks",
    ),
    ("POST", "/webhooks/twilio"): Op(
        "Twilio messages and status callbacks (X-Twilio-Signature)",
        {200: {}},
        errors=(400, 401, 413, 415, 422, 503),
        body={"type": "object"},
        content="application/x-www-form-urlencoded",
        answers="text/xml",
        tag="provider webhooks",
    ),
    ("POST", "/webhooks/generic/{channel_id}"): Op(
        "A generic channel's message, signed per Standard Webhooks",
        {200: {"type": "object"}, 202: {"type": "object"}},
        errors=(*BODY_ERRORS, 401, 404, 503),
        body=_model("GenericWebhook", GenericWebhook),
        tag="provider webhooks",
    ),
    # schedules
    ("PUT", "/v1/schedules/{key}"): Op(
        "Create or change a schedule (answered with the worker's decision)",
        {200: SCHEDULE, 201: SCHEDULE},
        errors=(*BODY_ERRORS, 409, 503, 504),
        body=_model("ScheduleIn", ScheduleIn),
        headers=IDEM,
        tag="schedules",
        ids=KEY,
    ),
    ("DELETE", "/v1/schedules/{key}"): Op(
        "Cancel a schedule",
        {200: SCHEDULE},
        errors=(400, 404, 409, 422, 503, 504),
        headers=IDEM,
        tag="schedules",
        ids=KEY,
    ),
    ("POST", "/v1/schedules/{key}/retry"): Op(
        "Run a failed schedule again",
        {200: SCHEDULE},
        errors=(400, 404, 409, 422, 503, 504),
        headers=IDEM,
        tag="schedules",
        ids=KEY,
    ),
    ("POST", "/v1/schedules/{key}/result"): Op(
        "Report the outcome of a fired schedule's work",
        {200: SCHEDULE},
        errors=(*BODY_ERRORS, 404, 409, 503, 504),
        body=_model("ResultIn", ResultIn),
        headers=IDEM,
        tag="schedules",
        ids=KEY,
    ),
    ("POST", "/v1/schedules:batch"): Op(
        f"Up to {MAX_BATCH:,} PUTs in one request; an answer per item, in order",
        {200: obj("items", items={"type": "array", "items": obj("code", code=INT)})},
        errors=(*BODY_ERRORS, 503, 504),
        body=_model("BatchIn", BatchIn),
        headers=IDEM,
        tag="schedules",
    ),
    ("GET", "/v1/schedules/{key}"): Op(
        "One schedule", {200: SCHEDULE}, errors=(400, 404, 422), tag="schedules", ids=KEY
    ),
    ("GET", "/v1/schedules"): Op(
        "Schedules by run time",
        {200: PAGE},
        errors=(400,),
        query={"status": STR, "event_type": STR, **CURSOR},
        tag="schedules",
    ),
    ("DELETE", "/v1/schedules"): Op(
        "Delete finished schedules older than `before`",
        {200: obj("deleted", deleted=INT)},
        errors=(400,),
        query={"before": STR, "status": STR},
        tag="schedules",
    ),
    # outgoing webhooks
    ("POST", "/v1/webhook-endpoints"): Op(
        "Register an endpoint (its secret is shown this once)",
        {201: CREATED_ENDPOINT},
        errors=BODY_ERRORS,
        body=_model("EndpointIn", ENDPOINT_IN),
        tag="outgoing webhooks",
    ),
    ("GET", "/v1/webhook-endpoints"): Op(
        "Endpoints, never a secret", {200: PAGE}, errors=(400,), query=CURSOR, tag="outgoing webhooks"
    ),
    ("GET", "/v1/webhook-endpoints/{id}"): Op(
        "One endpoint", {200: ENDPOINT}, (404,), tag="outgoing webhooks"
    ),
    ("PATCH", "/v1/webhook-endpoints/{id}"): Op(
        "Change an endpoint",
        {200: ENDPOINT},
        errors=(*BODY_ERRORS, 404),
        body=_model("EndpointPatch", ENDPOINT_PATCH),
        tag="outgoing webhooks",
    ),
    ("DELETE", "/v1/webhook-endpoints/{id}"): Op(
        "Delete an endpoint and its deliveries", {204: {}}, errors=(404,), tag="outgoing webhooks"
    ),
    ("POST", "/v1/webhook-endpoints/{id}/rotate-secret"): Op(
        "A new secret; the old one keeps signing for the overlap",
        {200: CREATED_ENDPOINT},
        errors=(404,),
        tag="outgoing webhooks",
    ),
    ("POST", "/v1/webhook-endpoints/{id}/test"): Op(
        "Send a signed ping now and show the answer",
        {200: obj("ok", "id", ok=BOOL, id=STR)},
        errors=(404, 422),
        tag="outgoing webhooks",
    ),
    ("GET", "/v1/webhook-endpoints/{id}/deliveries"): Op(
        "An endpoint's deliveries, newest first",
        {200: PAGE},
        errors=(400, 404),
        query={
            "status": {"type": "string", "enum": ["pending", "succeeded", "failed"]},
            "event_type": STR,
            **CURSOR,
        },
        tag="outgoing webhooks",
    ),
    ("GET", "/v1/webhook-deliveries/{id}"): Op(
        "One delivery with every attempt", {200: DELIVERY}, errors=(404,), tag="outgoing webhooks"
    ),
    ("POST", "/v1/webhook-deliveries/{id}/retry"): Op(
        "Make a delivery pending again", {202: DELIVERY}, errors=(404, 409), tag="outgoing webhooks"
    ),
    ("POST", "/v1/webhook-endpoints/{id}/replay"): Op(
        "Deliver the events of [since, until) again, with their original ids",
        {202: obj("endpoint_id", "count", endpoint_id=STR, count=INT)},
        errors=(*BODY_ERRORS, 404, 503),
        body=_model("ReplayIn", REPLAY_IN),
        tag="outgoing webhooks",
    ),
}


def _links(source: tuple[str, str, int], targets: list[tuple[str, str]], **params: str) -> None:
    for method, path in targets:
        name = _operation_id(method, path)
        LINKS.setdefault(source, {})[name] = {"operationId": name, "parameters": params}


# OpenAPI links: where an answer's ids can be used next (schemathesis' stateful phase follows them).
LINKS: dict[tuple[str, str, int], dict[str, Schema]] = {}
_ENDPOINT_OPS = [(m, p) for (m, p) in OPERATIONS if p.startswith("/v1/webhook-endpoints/{id}")]
_links(("POST", "/v1/webhook-endpoints", 201), _ENDPOINT_OPS, id="$response.body#/id")
_CHANNEL_OPS = [(m, p) for (m, p) in OPERATIONS if p.startswith("/v1/channels/{id}")]
_links(("POST", "/v1/channels", 201), _CHANNEL_OPS, id="$response.body#/id")
_SCHEDULE_OPS = [(m, p) for (m, p) in OPERATIONS if p.startswith("/v1/schedules/{key}") and m != "PUT"]
for _code in (200, 201):
    _links(("PUT", "/v1/schedules/{key}", _code), _SCHEDULE_OPS, key="$request.path.key")
_MESSAGE_OPS = [(m, p) for (m, p) in OPERATIONS if p.startswith("/v1/messages/{id}")]
_links(("POST", "/v1/channels/{id}/messages", 202), _MESSAGE_OPS, id="$response.body#/id")
_CONVERSATION_OPS = [(m, p) for (m, p) in OPERATIONS if p.startswith("/v1/conversations/{id}")]
_links(("GET", "/v1/conversations", 200), _CONVERSATION_OPS, id="$response.body#/items/0/id")


_REASONS = {
    400: "malformed request (bad JSON, query or header)",
    401: "missing or wrong credentials (`Authorization: Bearer $PARLEY_ADMIN_TOKEN` on /v1)",
    403: "refused",
    404: "no such resource",
    409: "conflicts with the resource's state",
    413: "body larger than PARLEY_MAX_BODY_BYTES",
    415: "unsupported content type",
    422: "the body does not validate; `details` says where",
    429: "too many of these running in this process; retry later",
    503: "Kafka or Postgres unavailable; retry",
    504: "the worker did not answer in time; the command may still apply (retry, same Idempotency-Key)",
}


def _operation(method: str, path: str, op: Op) -> Schema:
    params: list[Schema] = [
        {"name": name, "in": "path", "required": True, "schema": op.ids} for name in _path_params(path)
    ]
    params += [{"name": k, "in": "query", "required": False, "schema": v} for k, v in op.query.items()]
    params += [{"name": k, "in": "header", "required": False, "schema": v} for k, v in op.headers.items()]
    responses: dict[str, Schema] = {}
    for code, schema in op.ok.items():
        answer: Schema = {"description": "OK" if code < 300 else str(code)}
        if code != 204:
            answer["content"] = {op.answers: {"schema": schema} if schema else {}}
        if (method, path, code) in LINKS:
            answer["links"] = LINKS[(method, path, code)]
        responses[str(code)] = answer
    codes = {*op.errors, *((401,) if path.startswith("/v1/") else ())}
    for code in sorted({*codes, 400}):
        content: Schema = {"application/json": {"schema": ERROR}}
        if code == 400:  # aiohttp's HTTP parser answers a malformed request itself, in plain text
            content["text/plain"] = {"schema": STR}
        responses[str(code)] = {"description": _REASONS[code], "content": content}
    out: Schema = {
        "summary": op.summary,
        "operationId": _operation_id(method, path),
        "tags": [op.tag] if op.tag else [],
        "parameters": params,
        "responses": responses,
    }
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {op.content: {"schema": op.body}}}
    if path.startswith("/v1/"):
        out["security"] = [{"admin": []}]
    return out


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def document(app: web.Application | None = None) -> Schema:
    """The OpenAPI document of OPERATIONS (and of `app`'s routes, which must be the same set)."""
    paths: dict[str, Schema] = {}
    for (method, path), op in sorted(OPERATIONS.items()):
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, op)
    schemas: dict[str, Schema] = {
        "Error": obj("error", error=STR, details={"type": "array"}),
    }
    for name, adapter in _MODELS.items():
        schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
        for sub, definition in schema.pop("$defs", {}).items():
            schemas[sub] = definition
        schemas[name] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Parley",
            "version": "1",
            "description": "Conversation lifecycle engine: provider webhooks in, admin API, schedules, "
            "outgoing webhooks and outbound messages.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
    }


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves (HEAD, added for each GET, left out)."""
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path and route.method not in ("HEAD", "*"):
            found.add((route.method, path))
    return found


_SPEC: Schema | None = None


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """This API as OpenAPI 3.1."""
    global _SPEC
    if _SPEC is None:
        _SPEC = document()
    return web.json_response(_SPEC)


@routes.get("/docs")
async def docs(request: web.Request) -> web.FileResponse:
    """A page listing every operation of /openapi.json."""
    from importlib import resources

    return web.FileResponse(str(resources.files("api").joinpath("static/docs.html")))
