"""A real webhook receiver on loopback for the outgoing-webhooks tests, and endpoint helpers.

The receiver verifies every request's signature with the independent `standardwebhooks` package
(against each secret it was told about) and records what it got; a test decides per path how
it answers (status, Retry-After, hanging).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from parley.localstack import free_port
from tests.integration.harness import Deployment
from tests.integration.schedule_helpers import call


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()
    verified: bool  # the signature matched one of the path's secrets (standardwebhooks)

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]


Answer = Callable[[Received], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """Records every POST; `answers[path]` decides the response (default 200 at once)."""

    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    secrets: dict[str, list[str]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        got = Received(path, headers, body, time.monotonic(), self._verify(path, body, headers))
        self.requests.append(got)
        answer = self.answers.get(path)
        return await answer(got) if answer else web.Response(status=200, text="ok")

    def _verify(self, path: str, body: bytes, headers: dict[str, str]) -> bool:
        for secret in self.secrets.get(path, []):
            try:
                Webhook(secret).verify(body, headers)
                return True
            except WebhookVerificationError:
                continue
        return False


def status(code: int, headers: dict[str, str] | None = None) -> Answer:
    """Answer every request with this status."""

    async def answer(_: Received) -> web.StreamResponse:
        return web.Response(status=code, headers=headers or {}, text=f"answered {code}")

    return answer


def fail_first(n: int, code: int = 503) -> Answer:
    """Answer `code` to the first n requests of each webhook-id, then 200."""
    seen: dict[str, int] = {}

    async def answer(got: Received) -> web.StreamResponse:
        seen[got.id] = seen.get(got.id, 0) + 1
        return web.Response(status=code if seen[got.id] <= n else 200)

    return answer


def hang(seconds: float) -> Answer:
    """Answer 200, `seconds` late."""

    async def answer(_: Received) -> web.StreamResponse:
        await asyncio.sleep(seconds)  # the slow endpoint being simulated
        return web.Response(status=200)

    return answer


async def create_endpoint(
    http: aiohttp.ClientSession,
    dep: Deployment,
    receiver: Receiver,
    path: str,
    events: list[str] | None = None,
) -> dict[str, Any]:
    """Register receiver/path for `events` (default all); the receiver learns its secret."""
    code, body = await call(
        http, dep, "POST", "/v1/webhook-endpoints", {"url": receiver.url(path), "events": events or ["*"]}
    )
    assert code == 201, body
    receiver.secrets.setdefault(path, []).append(body["secret"])
    created: dict[str, Any] = body
    return created
