"""The emergency switch: pause and resume the lifecycle agent, the sender or the webhooks on every
worker (agents/pause.py). Inbound webhooks are still accepted while paused and queue in Kafka."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from api.context import CONTEXT, validated_body
from streams import pause_db
from streams.pause_db import Conn

routes = web.RouteTableDef()


class PauseIn(BaseModel):
    """POST /v1/admin/pause and /resume."""

    model_config = ConfigDict(extra="forbid")

    what: Literal["lifecycle", "sender", "webhooks", "all"]
    reason: str = Field("", max_length=500)


PAUSE_IN = TypeAdapter(PauseIn)


async def _answer(conn: Conn) -> web.Response:
    paused = await pause_db.paused(conn)
    return web.json_response({"paused": {part: at.isoformat() for part, at in paused.items()}})


async def _switch(
    request: web.Request, change: Callable[[Conn, tuple[str, ...], str], Awaitable[None]]
) -> web.Response:
    body = await validated_body(request, PAUSE_IN)
    if isinstance(body, web.Response):
        return body
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        await change(conn, pause_db.parts_of(body.what), body.reason)
        return await _answer(conn)


@routes.post("/v1/admin/pause")
async def pause(request: web.Request) -> web.Response:
    """Pause a part on every worker (until resumed; restarts keep it paused)."""
    return await _switch(request, pause_db.pause)


@routes.post("/v1/admin/resume")
async def resume(request: web.Request) -> web.Response:
    """Resume a paused part."""
    return await _switch(request, lambda conn, parts, _reason: pause_db.resume(conn, parts))


@routes.get("/v1/admin/paused")
async def paused(request: web.Request) -> web.Response:
    """What is paused, and since when."""
    async with request.app[CONTEXT].store.pool.acquire() as conn:
        return await _answer(conn)
