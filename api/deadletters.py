"""Dead letters: list them, and re-drive one (its event goes back to where it came from)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from api.context import CONTEXT, Context, error
from api.ingress import KafkaUnavailable

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# Letters parked by the webhook ingress hold a raw provider body; its provider re-drives it.
Redriver = Callable[[Context, str, str], Awaitable[int]]
REDRIVERS: dict[str, Redriver] = {}


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    """Newest first; `?before=<id>` pages, `?limit=` (1-500)."""
    try:
        limit = int(request.query.get("limit", "50"))
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        return error(400, "limit and before must be integers")
    if not 1 <= limit <= 500:
        return error(400, "limit must be between 1 and 500")
    items = await request.app[CONTEXT].store.dead_letters(limit=limit, before=before)
    return web.json_response(
        {"items": items, "next_before": items[-1]["id"] if len(items) == limit else None}
    )


@routes.post("/v1/dead-letters/{id}/retry")
async def retry_dead_letter(request: web.Request) -> web.Response:
    """Put the parked event back on its source topic (or re-run a parked webhook body): 202."""
    ctx = request.app[CONTEXT]
    try:
        letter_id = int(request.match_info["id"])
    except ValueError:
        return error(404, "no such dead letter")
    letter = await ctx.store.dead_letter(letter_id)
    if letter is None:
        return error(404, "no such dead letter")
    source = letter["source_topic"]
    try:
        if source.startswith("webhook:"):
            redrive = REDRIVERS.get(source.removeprefix("webhook:"))
            if redrive is None:
                return error(409, f"no re-driver for {source}")
            produced = await redrive(ctx, letter["key"] or "", letter["value"])
        elif source in ctx.topics.all():
            key = letter["key"].encode() if letter["key"] is not None else b""
            await ctx.ingress.send(source, key, letter["value"].encode())
            produced = 1
        else:
            return error(409, f"cannot re-drive a letter from {source!r}")
    except KafkaUnavailable:
        return error(503, "event log unavailable, retry later")
    await ctx.store.mark_retried(letter_id)
    log.info("dead letter %d re-driven to %s (%d event(s))", letter_id, source, produced)
    return web.json_response({"retried": letter_id, "events": produced}, status=202)
