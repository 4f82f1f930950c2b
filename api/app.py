"""Builds the API process: one aiohttp app with webhooks, admin API, health and dashboard."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from api import (
    admin,
    channels,
    dashboard,
    deadletters,
    messages,
    metrics,
    openapi,
    overview,
    pause,
    providers_routes,
    schedules,
    webhook_endpoints,
    webhooks,
    whatif,
)
from api.context import CONTEXT, ChannelCache, Context
from api.health import Readiness
from api.ingress import Ingress
from streams.channel_secrets import Sealer
from streams.schema import create_pool, migrate
from streams.settings import Settings
from streams.store import Store
from streams.topics import ensure_topics

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
READINESS: web.AppKey[Readiness] = web.AppKey("parley_readiness", Readiness)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Kafka and Postgres reachable and the worker group has its partitions (coarse names only).

    `?worker=false` leaves the worker out: an API process can accept webhooks into Kafka while
    the workers rebalance, so its own readiness probe (k8s) should not depend on them.
    """
    checks = dict(await request.app[READINESS].check())
    if request.query.get("worker", "true").lower() == "false":
        checks.pop("worker")
    ok = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


def create_app(settings: Settings) -> web.Application:
    """The API app; resources open on startup and close on cleanup."""
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[metrics.measure, admin.require_token]
    )
    app.add_routes(routes)
    app.add_routes(webhooks.routes)
    app.add_routes(admin.routes)
    app.add_routes(channels.routes)
    app.add_routes(dashboard.routes)
    app.add_routes(deadletters.routes)
    app.add_routes(providers_routes.routes)
    app.add_routes(schedules.routes)
    app.add_routes(webhook_endpoints.routes)
    app.add_routes(messages.routes)
    app.add_routes(whatif.routes)
    app.add_routes(openapi.routes)
    app.add_routes(metrics.routes)
    app.add_routes(overview.routes)
    app.add_routes(pause.routes)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, settings.db_pool_size)
        await migrate(pool)
        topics = await ensure_topics(settings)
        ingress = Ingress(settings)
        await ingress.start()
        store = Store(pool, Sealer(settings.secrets_key))
        cache = ChannelCache(store)
        await cache.start(settings.database_url)
        app[CONTEXT] = Context(settings, topics, store, ingress, cache)
        app[READINESS] = Readiness(pool, settings.kafka_bootstrap_servers, settings.app_id)
        yield
        await app[READINESS].close()
        await cache.stop()
        await ingress.stop()
        log.info("api stopped: Kafka producer flushed and closed")
        await pool.close()

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(schedules.answers_ctx)  # after resources: it uses CONTEXT
    app.cleanup_ctx.append(webhook_endpoints.sender_ctx)
    app.cleanup_ctx.append(whatif.jobs_ctx)
    app.cleanup_ctx.append(overview.sampler_ctx)
    return app
