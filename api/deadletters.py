"""Dead letters: list them, and re-drive one (its event goes back to where it came from)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.context import CONTEXT, Context, error, row_id
from api.ingress import KafkaUnavailable

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# Letters parked by the webhook ingress hold a raw provider body; its provider re-drives it.
Redriver = Callable[[Context, str, str], Awaitable[int]]
REDRIVERS: dict[str, Redriver] = {}


async def fetch_original(bootstrap: str, topic: str, partition: int, offset: int) -> bytes | None:
    """The raw value at topic/partition/offset, or None when it is gone (past retention)."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        first = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if not first <= offset < end:
            return None
        consumer.seek(tp, offset)
        for _ in range(20):  # a few fetches: the record is there, it only has to arrive
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=1)
            for record in batch.get(tp, []):
                return bytes(record.value or b"") if record.offset == offset else None
        return None
    finally:
        await consumer.stop()


@routes.get("/v1/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    """Newest first; `?before=<id>` pages, `?limit=` (1-500)."""
    try:
        limit = int(request.query.get("limit", "50"))
        before = row_id(request.query["before"]) if "before" in request.query else None
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
        letter_id = row_id(request.match_info["id"])
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
            if letter["truncated"]:
                return error(409, "the parked body was truncated; ask the provider to send it again")
            produced = await redrive(ctx, letter["key"] or "", letter["value"])
        elif source in ctx.topics.all():
            key = letter["key"].encode() if letter["key"] is not None else b""
            value = letter["value"].encode()
            if letter["truncated"]:
                # The letter holds only the head of the value: re-drive the original record.
                original = await fetch_original(
                    ctx.settings.kafka_bootstrap_servers,
                    source,
                    letter["source_partition"],
                    letter["source_offset"],
                )
                if original is None:
                    return error(409, "the letter was truncated and its original is past retention")
                value = original
            await ctx.ingress.send(source, key, value)
            produced = 1
        else:
            return error(409, f"cannot re-drive a letter from {source!r}")
    except KafkaUnavailable:
        return error(503, "event log unavailable, retry later")
    except LookupError as exc:  # e.g. a parked body that can no longer be read
        return error(409, f"cannot re-drive: {exc}")
    await ctx.store.mark_retried(letter_id)
    log.info("dead letter %d re-driven to %s (%d event(s))", letter_id, source, produced)
    return web.json_response({"retried": letter_id, "events": produced}, status=202)
