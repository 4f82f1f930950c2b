"""What every handler shares, stored on the aiohttp app under typed keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from api.ingress import Ingress
from channels import normalize
from streams.channel_secrets import Channel
from streams.settings import Settings
from streams.store import Store, match_secret
from streams.topics import Topics

log = logging.getLogger(__name__)


NOTIFY_CHANNEL = "parley_channels"  # streams/migrations/0005: a trigger notifies every change


class ChannelCache:
    """Channel configs for the webhook hot path, kept until Postgres says a channel changed.

    Every API process listens on a dedicated connection for `parley_channels` notifications (sent
    by a trigger when any channel row changes, on commit) and drops its entries, so a rotation or
    deletion through one process is seen by all of them at once. Unknown ids are cached too
    (negative entries): a flood of webhooks for a channel that does not exist costs no query each;
    a channel created later is a change like any other. While the listening connection is down
    nothing is cached and every lookup goes to Postgres: a stale secret is never served.
    """

    def __init__(self, store: Store, max_entries: int = 10_000) -> None:
        self.store = store
        self.max_entries = max_entries
        self.lookups = 0  # queries made on a miss (tests and metrics)
        self._entries: dict[str, Channel | None] = {}
        self._whatsapp: list[Channel] | None = None
        self._generation = 0
        self._listening = False
        self._listener: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()

    @property
    def listening(self) -> bool:
        """Whether changes are being heard (else nothing is cached)."""
        return self._listening

    def invalidate(self, *_: object) -> None:
        """Forget everything (a channel changed, or notifications may have been missed)."""
        self._generation += 1
        self._entries.clear()
        self._whatsapp = None

    async def start(self, dsn: str) -> None:
        """Start listening; returns after the first attempt (the cache works either way)."""
        self._listener = asyncio.create_task(self._listen(dsn))
        await self._first_attempt.wait()

    async def stop(self) -> None:
        """Stop listening."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def _listen(self, dsn: str) -> None:
        while True:
            try:
                await self._listen_once(dsn)
                log.warning("channel cache: listening connection lost; caching off until it is back")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("channel cache: cannot listen for channel changes (%s); caching off", exc)
            finally:
                self._listening = False
                self.invalidate()
                self._first_attempt.set()
            await asyncio.sleep(1)  # reconnect back-off

    async def _listen_once(self, dsn: str, keepalive: float = 10) -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(NOTIFY_CHANNEL, self.invalidate)
            self.invalidate()  # whatever changed while nobody listened
            self._listening = True
            self._first_attempt.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), keepalive)
                if not lost.is_set():  # a dead peer without a FIN is found by asking
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), keepalive)
        finally:
            self._listening = False
            conn.terminate()

    def _remember(self, generation: int, key: str, found: Channel | None) -> None:
        # A change notified while the query ran makes its answer stale: keep nothing then.
        if not self._listening or generation != self._generation:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))  # the oldest
        self._entries[key] = found

    async def _lookup(self, key: str, query: Callable[[], Awaitable[Channel | None]]) -> Channel | None:
        if self._listening and key in self._entries:
            return self._entries[key]
        generation = self._generation
        self.lookups += 1
        found = await query()
        self._remember(generation, key, found)
        return found

    async def record(self, channel_id: str) -> Channel | None:
        """The channel with its secrets, or None."""
        return await self._lookup("id:" + channel_id, lambda: self.store.channel_record(channel_id))

    async def get(self, channel_id: str) -> tuple[str, dict[str, Any]] | None:
        """(provider, config) of the channel, or None if unknown; config carries `<secret>s`, the
        list of secrets active now (primary first) beside the primary `<secret>`."""
        found = await self.record(channel_id)
        return (found.provider, found.config(datetime.now(UTC))) if found else None

    async def get_by(self, provider: str, field: str, value: str) -> tuple[str, dict[str, Any]] | None:
        """(channel id, config) by a provider id (phone_number_id, account_sid) or by one of the
        active WhatsApp verify tokens (compared in constant time over the WhatsApp channels)."""
        now = datetime.now(UTC)
        if field == "verify_token":
            channels = self._whatsapp if self._listening else None
            if channels is None:
                generation = self._generation
                self.lookups += 1
                channels = await self.store.provider_channels(provider)
                if self._listening and generation == self._generation:
                    self._whatsapp = channels
            found = match_secret(channels, field, value, now)
        else:
            found = await self._lookup(
                f"{provider}:{field}:{value}", lambda: self.store.channel_record_by(provider, field, value)
            )
        return (found.id, found.config(now)) if found else None


@dataclass
class Context:
    """Settings and live resources of one API process."""

    settings: Settings
    topics: Topics
    store: Store
    ingress: Ingress
    channels: ChannelCache


CONTEXT: web.AppKey[Context] = web.AppKey("parley_context", Context)


BIGINT_MAX = 2**63 - 1


def row_id(text: str) -> int:
    """A bigint id or cursor from a path or query string; ValueError if it is not one (a number
    past Postgres' bigint would otherwise fail in the query: a 500 instead of a 4xx)."""
    value = int(text)
    if not 0 <= value <= BIGINT_MAX:
        raise ValueError(f"{text!r} is not an id")
    return value


def error(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error response with a human-readable reason."""
    return web.json_response({"error": message, **extra}, status=status)


M = TypeVar("M")


async def json_body(request: web.Request) -> Any:
    """The JSON body of a request to our own API, or the 4xx answering it: bad JSON (400), deeper
    than the ingress limit or holding NUL (422: it could not be stored)."""
    try:
        parsed = normalize.load_json(await request.read())
    except normalize.IngressError as exc:
        return error(exc.status, str(exc))
    if normalize.has_nul(parsed):
        return error(422, "strings must not contain NUL (\\u0000): it cannot be stored")
    return parsed


async def validated_body(request: web.Request, adapter: TypeAdapter[M]) -> M | web.Response:
    """json_body validated by `adapter`, or the 4xx (422 with the failing fields)."""
    parsed = await json_body(request)
    if isinstance(parsed, web.Response):
        return parsed
    try:
        return adapter.validate_python(parsed)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_context=False, include_input=False)
        return error(422, f"body does not match {exc.title}", details=details)
