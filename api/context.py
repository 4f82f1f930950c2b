"""What every handler shares, stored on the aiohttp app under typed keys."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from api.ingress import Ingress
from streams.settings import Settings
from streams.store import Store
from streams.topics import Topics


@dataclass
class ChannelCache:
    """Channel configs cached briefly: the webhook hot path must not query Postgres each time."""

    store: Store
    ttl: float = 5.0
    _entries: dict[str, tuple[float, tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    _by: dict[str, tuple[float, tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    async def get(self, channel_id: str) -> tuple[str, dict[str, Any]] | None:
        """(provider, config) of the channel, or None if unknown (unknown ids are not cached)."""
        hit = self._entries.get(channel_id)
        now = time.monotonic()
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        found = await self.store.channel(channel_id)
        if found is not None:
            self._entries[channel_id] = (now, found)
        return found

    async def get_by(self, provider: str, field: str, value: str) -> tuple[str, dict[str, Any]] | None:
        """(channel id, config) by a provider id (phone_number_id, account_sid), cached briefly."""
        cache_key = f"{provider}:{field}:{value}"
        hit = self._by.get(cache_key)
        now = time.monotonic()
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        found = await self.store.channel_by(provider, field, value)
        if found is not None:
            self._by[cache_key] = (now, found)
        return found


@dataclass
class Context:
    """Settings and live resources of one API process."""

    settings: Settings
    topics: Topics
    store: Store
    ingress: Ingress
    channels: ChannelCache


CONTEXT: web.AppKey[Context] = web.AppKey("parley_context", Context)


def error(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error response with a human-readable reason."""
    return web.json_response({"error": message, **extra}, status=status)
