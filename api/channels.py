"""Admin API for channels (bearer token): register, list, rotate secrets, delete.

Secrets are sealed at rest (streams/channel_secrets.py) and never returned. A rotation keeps the
previous secret valid for a grace period (PARLEY_SECRET_ROTATION_GRACE, or `keep_previous_for`
seconds in the request; 0 drops it at once) so senders can switch without a window of rejected
webhooks; `revoke_previous` ends every grace period at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from api.context import CONTEXT, error, validated_body
from channels.config import CHANNEL_IN
from streams.channel_secrets import SECRET_FIELDS, rotate
from streams.sends_db import resume_channel
from streams.store import DuplicateChannel

routes = web.RouteTableDef()


class ChannelPatch(BaseModel):
    """PATCH /v1/channels/{id}: new secrets (each becomes the primary), for the channel's provider."""

    model_config = ConfigDict(extra="forbid")

    secret: str | None = Field(None, pattern=r"^whsec_[A-Za-z0-9+/=]{16,}$")
    app_secret: str | None = Field(None, min_length=8, max_length=256)
    verify_token: str | None = Field(None, min_length=8, max_length=256)
    auth_token: str | None = Field(None, min_length=16, max_length=256)
    access_token: str | None = Field(None, min_length=8, max_length=2048)
    keep_previous_for: float | None = Field(None, ge=0, le=30 * 24 * 3600)
    revoke_previous: bool = False


CHANNEL_PATCH = TypeAdapter(ChannelPatch)


@routes.post("/v1/channels")
async def create_channel(request: web.Request) -> web.Response:
    """Register a channel; its secrets are sealed and never shown again."""
    body = await validated_body(request, CHANNEL_IN)
    if isinstance(body, web.Response):
        return body
    ctx = request.app[CONTEXT]
    try:
        created = await ctx.store.create_channel(
            body.id, body.provider, body.model_dump(exclude={"id", "provider"})
        )
    except DuplicateChannel as exc:
        return error(409, str(exc))
    return web.json_response(
        {"id": body.id, "provider": body.provider, "created_at": created.isoformat()}, status=201
    )


@routes.get("/v1/channels")
async def list_channels(request: web.Request) -> web.Response:
    """Every channel, without secrets."""
    return web.json_response({"items": await request.app[CONTEXT].store.channels()})


@routes.get("/v1/channels/{id}")
async def get_channel(request: web.Request) -> web.Response:
    """One channel, without secrets (how many are active and when the previous ones expire)."""
    found = await request.app[CONTEXT].store.channel_record(request.match_info["id"])
    return web.json_response(found.summary(datetime.now(UTC))) if found else error(404, "no such channel")


@routes.patch("/v1/channels/{id}")
async def patch_channel(request: web.Request) -> web.Response:
    """Rotate a channel's secrets; every API process sees the change at once (200)."""
    ctx = request.app[CONTEXT]
    body = await validated_body(request, CHANNEL_PATCH)
    if isinstance(body, web.Response):
        return body
    channel_id = request.match_info["id"]
    current = await ctx.store.channel_record(channel_id)
    if current is None:
        return error(404, "no such channel")
    allowed = SECRET_FIELDS[current.provider]
    given = body.model_dump(exclude_none=True, exclude={"keep_previous_for", "revoke_previous"})
    if wrong := sorted(set(given) - set(allowed)):
        return error(422, f"a {current.provider} channel has no {', '.join(wrong)}", secrets=list(allowed))
    if not given and not body.revoke_previous:
        return error(422, f"nothing to change: give one of {', '.join(allowed)} or revoke_previous")
    grace = (
        timedelta(seconds=body.keep_previous_for)
        if body.keep_previous_for is not None
        else ctx.settings.secret_rotation_grace
    )
    now = datetime.now(UTC)
    changed = await ctx.store.update_channel(
        channel_id,
        lambda ch: rotate(ch, given, now=now, keep_previous_for=grace, revoke_previous=body.revoke_previous),
    )
    if changed is None:
        return error(404, "no such channel")
    if "access_token" in given or "auth_token" in given:  # a paused channel's sends go again
        async with ctx.store.pool.acquire() as conn:
            await resume_channel(conn, channel_id, now)
    return web.json_response(changed.summary(now))


@routes.delete("/v1/channels/{id}")
async def delete_channel(request: web.Request) -> web.Response:
    """Remove a channel: its webhooks get 404 from now on; its conversations and history stay."""
    if not await request.app[CONTEXT].store.delete_channel(request.match_info["id"]):
        return error(404, "no such channel")
    return web.Response(status=204)
