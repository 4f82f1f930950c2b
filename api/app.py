"""Builds the API process: one aiohttp app with webhooks, admin API, health and dashboard."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from api import admin, dashboard, deadletters, providers_routes, webhooks
from api.context import CONTEXT, ChannelCache, Context
from api.ingress import Ingress
from streams.schema import create_pool, migrate
from streams.settings import Settings
from streams.store import Store
from streams.topics import ensure_topics

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up."""
    return web.json_response({"status": "ok"})


async def _worker_ready(admin_client: AIOKafkaAdminClient, group: str) -> tuple[bool, str]:
    # The worker is ready when its consumer group is Stable with members holding partitions.
    [response] = await admin_client.describe_consumer_groups([group])
    _err, _gid, state, _ptype, _proto, members, *_ = response.groups[0]
    return state == "Stable" and len(members) > 0, f"{state}, {len(members)} member(s)"


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Kafka and Postgres reachable and the worker group has its partitions.

    `?worker=false` leaves the worker out: an API process can accept webhooks into Kafka while
    the workers rebalance, so its own readiness probe (k8s) should not depend on them.
    """
    with_worker = request.query.get("worker", "true").lower() != "false"
    ctx = request.app[CONTEXT]
    checks: dict[str, str] = {}
    ok = True
    try:
        await asyncio.wait_for(ctx.store.pool.fetchval("SELECT 1"), 2)
        checks["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; report which
        ok, checks["postgres"] = False, f"{type(exc).__name__}: {exc}"
    admin_client = AIOKafkaAdminClient(
        bootstrap_servers=ctx.settings.kafka_bootstrap_servers, request_timeout_ms=2000
    )
    try:
        await asyncio.wait_for(admin_client.start(), 3)
        await asyncio.wait_for(admin_client.list_topics(), 3)
        checks["kafka"] = "ok"
        if with_worker:
            worker_ok, detail = await asyncio.wait_for(_worker_ready(admin_client, ctx.settings.app_id), 3)
            checks["worker"] = detail
            ok = ok and worker_ok
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; report which
        ok, checks["kafka"] = False, f"{type(exc).__name__}: {exc}"
    finally:
        await admin_client.close()
    return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)


def create_app(settings: Settings) -> web.Application:
    """The API app; resources open on startup and close on cleanup."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[admin.require_token])
    app.add_routes(routes)
    app.add_routes(webhooks.routes)
    app.add_routes(admin.routes)
    app.add_routes(dashboard.routes)
    app.add_routes(deadletters.routes)
    app.add_routes(providers_routes.routes)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, settings.db_pool_size)
        await migrate(pool)
        topics = await ensure_topics(settings)
        ingress = Ingress(settings)
        await ingress.start()
        store = Store(pool)
        app[CONTEXT] = Context(settings, topics, store, ingress, ChannelCache(store))
        yield
        await ingress.stop()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
