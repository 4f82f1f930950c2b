"""agents.webhook_client against real aiohttp servers on 127.0.0.1: signatures checked by the
independent `standardwebhooks` package, statuses, Retry-After, redirects, body and time limits,
and the SSRF guard.

The SSRF tests never let a packet leave the machine: names come from a fake resolver, and the
sender's socket factory (called by aiohttp for every connection it opens) records the address
and raises instead of connecting. A positive control shows that hook is really in the path.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from agents.webhook_client import Attempt, WebhookSender, parse_retry_after
from channels.signatures import standard_webhook_key

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY = json.dumps({"type": "conversation.closed", "id": "evt_1", "data": {"n": 1}}).encode()


@dataclass
class Receiver:
    """A webhook receiver on a free loopback port; records every request it gets."""

    url: str = ""
    requests: list[tuple[dict[str, str], bytes, object]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # lets hanging handlers end
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def receiver(handler: Handler) -> AsyncIterator[Receiver]:
    """Serve `handler` on 127.0.0.1:<free port>, recording each request before handling it."""
    rx = Receiver()

    async def record(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rx.requests.append((dict(request.headers), await request.read(), peer))
        rx.arrived.set()
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    rx.url = f"http://{host}:{port}/hook"
    try:
        yield rx
    finally:
        rx.release.set()
        await runner.cleanup()


def status(code: int, headers: dict[str, str] | None = None, text: str = "") -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers=headers, text=text)

    return handle


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@asynccontextmanager
async def loopback_sender(**kwargs: Any) -> AsyncIterator[WebhookSender]:
    async with WebhookSender(allow_http=True, allow_private=True, **kwargs) as sender:
        yield sender


async def send(sender: WebhookSender, url: str, keys: list[bytes] | None = None) -> Attempt:
    keys = keys or [standard_webhook_key(new_secret())]
    return await sender.send(url, "msg_" + secrets.token_hex(6), int(time.time()), BODY, keys)


# --- delivery and signatures -----------------------------------------------------------------


async def test_delivery_is_signed_for_every_key_and_verifies_with_standardwebhooks() -> None:
    old, new, unrelated = new_secret(), new_secret(), new_secret()
    async with receiver(status(200, text="thanks")) as rx, loopback_sender() as sender:
        sent_at = int(time.time())
        keys = [standard_webhook_key(old), standard_webhook_key(new)]
        attempt = await sender.send(rx.url, "msg_rotation", sent_at, BODY, keys)

    assert attempt.ok and attempt.status == 200 and attempt.error is None
    assert attempt.body == "thanks" and attempt.retry_after is None and attempt.latency_ms > 0
    [(headers, body, _)] = rx.requests
    assert body == BODY
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Parley-Webhooks/1"
    assert headers["webhook-id"] == "msg_rotation"
    assert headers["webhook-timestamp"] == str(sent_at)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a receiver on either side of the rotation accepts it
        assert Webhook(secret).verify(body, headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(unrelated).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # the signature covers the body
        Webhook(old).verify(body + b" ", headers)


async def test_connections_are_kept_alive_between_sends() -> None:
    async with receiver(status(204)) as rx, loopback_sender() as sender:
        first, second = await send(sender, rx.url), await send(sender, rx.url)
    assert first.ok and second.ok and first.status == 204
    assert rx.requests[0][2] == rx.requests[1][2]  # same client address: one connection


# --- statuses and Retry-After ----------------------------------------------------------------


async def test_server_error_is_a_failed_attempt_with_the_body() -> None:
    async with receiver(status(500, text="boom")) as rx, loopback_sender() as sender:
        attempt = await send(sender, rx.url)
    assert not attempt.ok
    assert (attempt.status, attempt.error, attempt.body) == (500, "HTTP 500", "boom")
    assert attempt.retry_after is None


async def test_429_retry_after_seconds() -> None:
    async with receiver(status(429, {"Retry-After": "2"})) as rx, loopback_sender() as sender:
        attempt = await send(sender, rx.url)
    assert (attempt.status, attempt.error, attempt.retry_after) == (429, "HTTP 429", 2.0)


async def test_503_retry_after_http_date() -> None:
    when = formatdate(time.time() + 120, usegmt=True)
    async with receiver(status(503, {"Retry-After": when})) as rx, loopback_sender() as sender:
        attempt = await send(sender, rx.url)
    assert attempt.status == 503 and attempt.error == "HTTP 503"
    assert attempt.retry_after is not None and 110 <= attempt.retry_after <= 120


async def test_retry_after_is_capped() -> None:
    async with (
        receiver(status(429, {"Retry-After": "86400"})) as rx,
        loopback_sender(retry_after_cap=60.0) as sender,
    ):
        attempt = await send(sender, rx.url)
    assert attempt.retry_after == 60.0


async def test_retry_after_is_ignored_on_other_statuses() -> None:
    async with receiver(status(500, {"Retry-After": "5"})) as rx, loopback_sender() as sender:
        attempt = await send(sender, rx.url)
    assert attempt.retry_after is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("17", 17.0),
        (" 3 ", 3.0),
        ("99999", 100.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # in the past: now
        ("Thu, 01 Jan 1970 00:01:40 GMT", 0.0),
        ("-5", None),
        ("1.5", None),
        ("\u00b2", None),  # str.isdigit() is true for "²", float() refuses it
        ("9" * 400, 100.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=1_000_000_000.0, cap=100.0) == expected


def test_parse_retry_after_http_date_is_relative_to_now() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 42, usegmt=True), now=now, cap=3600) == 42.0


# --- redirects, limits, failures -------------------------------------------------------------


async def test_redirects_are_never_followed() -> None:
    async with receiver(status(200)) as target:
        async with (
            receiver(status(302, {"Location": target.url})) as rx,
            loopback_sender() as sender,
        ):
            attempt = await send(sender, rx.url)
        assert attempt.status == 302 and not attempt.ok
        assert attempt.error == f"redirect not followed (302 to {target.url})"
        assert len(rx.requests) == 1
        assert target.requests == []


async def test_only_max_body_bytes_of_a_huge_response_are_read() -> None:
    """The server promises 100 MB, sends 1 MB and then stalls: reading it all would time out."""

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        resp.content_length = 100_000_000
        await resp.prepare(request)
        await resp.write(b"x" * 1_000_000)
        await rx.release.wait()
        return resp

    async with receiver(huge) as rx, loopback_sender(max_body=1000, timeout=5.0) as sender:
        async with asyncio.timeout(10):
            attempt = await send(sender, rx.url)
    assert attempt.error is None and attempt.ok
    assert attempt.body == "x" * 1000


async def test_invalid_utf8_body_is_replaced_not_raised() -> None:
    async def binary(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, body=b"\xff\xfebad")

    async with receiver(binary) as rx, loopback_sender() as sender:
        attempt = await send(sender, rx.url)
    assert attempt.status == 400 and attempt.body == "\ufffd\ufffdbad"


async def test_hanging_server_times_out() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await rx.release.wait()
        return web.Response()

    async with receiver(hang) as rx, loopback_sender(timeout=0.5) as sender:
        started = time.monotonic()
        async with asyncio.timeout(5):  # a sender without a timeout fails here instead of hanging
            attempt = await send(sender, rx.url)
        elapsed = time.monotonic() - started
    assert (attempt.status, attempt.error) == (None, "timeout after 0.5s")
    assert 0.4 <= elapsed < 2.0
    assert len(rx.requests) == 1


async def test_cancellation_propagates() -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await rx.release.wait()
        return web.Response()

    async with receiver(hang) as rx, loopback_sender() as sender:
        task = asyncio.create_task(send(sender, rx.url))
        await rx.arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_connection_refused_is_an_attempt() -> None:
    with closed_port() as port:
        async with loopback_sender() as sender:
            attempt = await send(sender, f"http://127.0.0.1:{port}/hook")
    assert (attempt.status, attempt.error, attempt.body) == (None, "connection refused", "")


async def test_caller_bugs_raise() -> None:
    sender = WebhookSender(allow_http=True, allow_private=True)
    with pytest.raises(RuntimeError):
        await send(sender, "http://127.0.0.1:1/")
    async with sender:
        with pytest.raises(ValueError, match="signing key"):
            await sender.send("http://127.0.0.1:1/", "msg_1", int(time.time()), BODY, [])


# --- SSRF guard ------------------------------------------------------------------------------


class FakeResolver(AbstractResolver):
    """Answers test names from a table; other names fail like NXDOMAIN. Each answer list is used
    in turn per name (the last one repeats), which lets a test change DNS between lookups."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        answers = self.table.get(host)
        if not answers:
            raise OSError(errno.ENOENT, f"{host} not in the test table")
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [self._result(host, address, port) for address in addresses]

    @staticmethod
    def _result(host: str, address: str, port: int) -> ResolveResult:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return ResolveResult(hostname=host, host=address, port=port, family=family, proto=0, flags=0)

    async def close(self) -> None:
        pass


class ConnectTrap:
    """The sender's socket factory: records where aiohttp wanted to connect, connects nowhere."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    def __call__(self, addr_info: aiohttp.AddrInfoType) -> socket.socket:
        self.addresses.append(str(addr_info[4][0]))
        raise OSError(errno.ECONNREFUSED, "connection blocked by the test")


@dataclass
class Guarded:
    sender: WebhookSender
    resolver: FakeResolver
    trap: ConnectTrap


def dns_table() -> dict[str, list[list[str]]]:
    return {
        "public.example.test": [["93.184.215.14"]],
        "public6.example.test": [["2606:4700::1111"]],
        "internal.example.test": [["127.0.0.1"]],
        "ten.example.test": [["10.1.2.3"]],
        "mixed.example.test": [["93.184.215.14", "10.0.0.7"]],
        "metadata.example.test": [["169.254.169.254"]],
        "mapped.example.test": [["::ffff:127.0.0.1"]],
        "rebind.example.test": [["93.184.215.14"], ["127.0.0.1"]],
    }


@pytest.fixture
async def guarded() -> AsyncIterator[Guarded]:
    resolver, trap = FakeResolver(dns_table()), ConnectTrap()
    async with WebhookSender(
        allow_http=False, allow_private=False, resolver=resolver, socket_factory=trap
    ) as sender:
        yield Guarded(sender, resolver, trap)


async def test_control_a_public_destination_reaches_the_connect_step(guarded: Guarded) -> None:
    """Shows the trap is in the path, so `trap.addresses == []` below means something."""
    destinations = (("public.example.test", "93.184.215.14"), ("public6.example.test", "2606:4700::1111"))
    for host, address in destinations:
        attempt = await send(guarded.sender, f"https://{host}/hook")
        assert attempt.error == "connection refused"
        assert guarded.trap.addresses[-1] == address
    assert guarded.resolver.lookups == ["public.example.test", "public6.example.test"]


REFUSED = {
    "https://127.0.0.1/": "127.0.0.1 is loopback",
    "https://localhost/": "localhost is loopback",
    "https://[::1]/": "::1 is loopback",
    "https://10.0.0.1/": "10.0.0.1 is private",
    "https://172.16.0.1/": "172.16.0.1 is private",
    "https://192.168.0.1/": "192.168.0.1 is private",
    "https://169.254.169.254/latest/meta-data/": "169.254.169.254 is link-local",
    "https://100.64.0.1/": "100.64.0.1 is shared address space (CGNAT)",
    "https://0.0.0.0/": "0.0.0.0 is unspecified",
    "https://[::ffff:127.0.0.1]/": "is loopback (embedded IPv4 127.0.0.1)",
    "https://127.1/": "not a canonical IP address",
    "https://internal.example.test/": "127.0.0.1 is loopback",
    "https://ten.example.test/": "10.1.2.3 is private",
    "https://mixed.example.test/": "10.0.0.7 is private",
    "https://metadata.example.test/": "169.254.169.254 is link-local",
    "https://mapped.example.test/": "is loopback (embedded IPv4 127.0.0.1)",
    "http://public.example.test/": "scheme http is not allowed",
    "https://user:pw@public.example.test/": "userinfo",
    "https://public.example.test/#x": "fragment",
    "https://public.example.test/\r\nX-Injected: 1": "control characters",
    "https://public.example.test:0/": "port 0",
}


@pytest.mark.parametrize(("url", "reason"), REFUSED.items())
async def test_private_destinations_are_refused_before_connecting(
    guarded: Guarded, url: str, reason: str
) -> None:
    attempt = await send(guarded.sender, url)
    assert attempt.status is None and not attempt.ok
    assert attempt.error is not None
    assert attempt.error.startswith("refused by SSRF guard: ") and reason in attempt.error, attempt.error
    assert guarded.trap.addresses == []


async def test_names_are_resolved_only_through_the_guard(guarded: Guarded) -> None:
    """IP literals and URLs refused by check_url never reach the resolver; names do."""
    await send(guarded.sender, "https://127.0.0.1/")
    await send(guarded.sender, "https://localhost/")
    await send(guarded.sender, "https://ten.example.test/")
    assert guarded.resolver.lookups == ["ten.example.test"]


async def test_dns_rebinding_never_reaches_the_private_address(guarded: Guarded) -> None:
    """The name answers public, then loopback: whether aiohttp reuses its cached (guarded) answer
    or asks again, the connection only ever goes to the public address."""
    first = await send(guarded.sender, "https://rebind.example.test/")
    second = await send(guarded.sender, "https://rebind.example.test/")
    assert first.error == "connection refused"
    assert second.error in ("connection refused", "refused by SSRF guard: 127.0.0.1 is loopback")
    assert guarded.trap.addresses and set(guarded.trap.addresses) == {"93.184.215.14"}


async def test_rebinding_after_the_cache_expires_is_refused() -> None:
    resolver, trap = FakeResolver(dns_table()), ConnectTrap()
    async with WebhookSender(
        allow_http=False, allow_private=False, resolver=resolver, socket_factory=trap
    ) as sender:
        first = await send(sender, "https://rebind.example.test/")
        assert sender._session is not None
        connector = sender._session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        connector.clear_dns_cache()  # what the TTL expiring does
        second = await send(sender, "https://rebind.example.test/")
    assert first.error == "connection refused"
    assert second.error == "refused by SSRF guard: 127.0.0.1 is loopback"
    assert resolver.lookups == ["rebind.example.test", "rebind.example.test"]
    assert trap.addresses == ["93.184.215.14"]
