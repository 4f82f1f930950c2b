"""The API's Prometheus metrics at GET /metrics (no token: counters only, nothing secret).

- parley_api_requests_total{route,method,code}: every answer, by route template (never the raw
  path: ids would make a series per conversation) and status code;
- parley_api_request_duration_seconds{route,method}: time to answer, a histogram;
- parley_api_produce_duration_seconds: from handing records to Kafka to the acks=all answer;
- parley_api_webhook_rejections_total{provider,reason}: provider webhooks answered 4xx/5xx, by why
  (signature, malformed, invalid, too_large, content_type, verify_token, unavailable).

- parley_api_process_info{pid}: 1, labelled with this process' id.

Each API process counts its own; Prometheus sums them. Under `parley api --processes N` the N
processes share one port and a scrape reaches one of them (the pid label says which): its counters
are that process' own, so scrape each process (or sum by pid) rather than one address.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "parley_api_requests_total",
    "Answers by route, method and status code",
    ["route", "method", "code"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "parley_api_request_duration_seconds",
    "Time to answer a request",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
PRODUCE = Histogram(
    "parley_api_produce_duration_seconds",
    "From handing records to Kafka to their acks=all acknowledgement",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "parley_api_webhook_rejections_total",
    "Provider webhooks not accepted, by provider and reason",
    ["provider", "reason"],
    registry=REGISTRY,
)
PROCESS = Gauge("parley_api_process_info", "This API process, by process id", ["pid"], registry=REGISTRY)
PROCESS.labels(str(os.getpid())).set(1)

_REASONS = {
    400: "malformed",
    401: "signature",
    403: "verify_token",
    413: "too_large",
    415: "content_type",
    422: "invalid",
    503: "unavailable",
}


def route_of(request: web.Request) -> str:
    """The matched route's template (`/v1/conversations/{id}`), or `unmatched`."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


def rejection_reason(status: int) -> str:
    """Why a provider webhook was not accepted, from its status code."""
    return _REASONS.get(status, "error" if status >= 500 else "other")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every answer (an exception counts as the status it becomes)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = route_of(request)
        if route != "/metrics":
            REQUESTS.labels(route, request.method, str(status)).inc()
            DURATION.labels(route, request.method).observe(time.perf_counter() - started)
            if route.startswith("/webhooks/") and status >= 400:
                provider = route.split("/")[2]
                REJECTIONS.labels(provider, rejection_reason(status)).inc()


routes = web.RouteTableDef()
routes.get("/metrics")(make_aiohttp_handler(REGISTRY))
