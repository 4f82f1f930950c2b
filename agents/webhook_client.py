"""The outgoing-webhook sender: one signed POST per call, every outcome an `Attempt`, never a raise.

The delivery engine decides when to send and whether to retry; this module only performs one
attempt and describes what happened, so every failure (timeout, refused connection, HTTP 500,
redirect, SSRF refusal) reaches the caller as data it can record and show to the tenant. Only
cancellation propagates.

Requests follow Standard Webhooks (https://www.standardwebhooks.com/): `webhook-id`,
`webhook-timestamp` and `webhook-signature` with one `v1,<base64>` per key, so a receiver keeps
verifying while its secret rotates.

Safety, because tenants choose the URLs:
- SSRF: `check_url` refuses bad schemes, userinfo, localhost and forbidden IP literals before
  anything happens. Host names are resolved through `GuardedResolver`, which refuses the name if
  ANY of its addresses is forbidden; aiohttp then connects only to the addresses the guard
  returned (and caches only those), so a DNS answer that changes between check and connect
  (rebinding) cannot reach a private address. aiohttp never calls the resolver for IP-literal
  hosts (connector `_resolve_host`), which is why `send` checks the URL itself first.
- Redirects are never followed (a 302 to http://169.254.169.254/ would bypass every check
  above); a 3xx is a failed attempt.
- Bounded cost per attempt: one timeout for connect, each read and the whole attempt; at most
  `max_body` bytes of the response are read; responses are not decompressed (no zip bombs);
  no cookies, no proxy from the environment.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from channels.signatures import sign_standard_webhook
from channels.ssrf import check_url, forbidden_reason

USER_AGENT = "Parley-Webhooks/1"
REFUSED = "refused by SSRF guard: "
_MAX_ERROR = 300
_E = TypeVar("_E", bound=BaseException)


class SSRFRefused(OSError):
    """A resolved address is one we must not connect to. An OSError so that aiohttp treats it
    like any resolution failure (wrapped in ClientConnectorDNSError, nothing cached)."""


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and refuses the host if any of its addresses is forbidden.

    Refusing on ANY (not dropping the bad ones) keeps the rule simple to explain: a name that
    points into a private network, even partly, is not a webhook destination.
    """

    def __init__(self, inner: AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            _refuse_if_forbidden(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


def _refuse_if_forbidden(address: str) -> None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise SSRFRefused(f"resolver returned {address!r}, not an IP address") from exc
    reason = forbidden_reason(ip)
    if reason is not None:
        raise SSRFRefused(f"{ip} is {reason}")


@dataclass(frozen=True)
class Attempt:
    """The outcome of one POST."""

    status: int | None  # HTTP status; None when there was no response
    latency_ms: float
    error: str | None  # None on 2xx; else a short reason for people ("HTTP 500", "timeout after 10.0s")
    retry_after: float | None  # seconds the receiver asked us to wait (429/503), capped
    body: str  # the start of the response body (at most max_body bytes), utf-8 with replacements
    # False only when the request certainly never reached the server (refused by the guard, DNS,
    # connect or TLS failure): what tells "send again" from "in doubt" for outbound messages
    may_have_arrived: bool = True

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_retry_after(value: str | None, *, now: float, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), within [0, cap]; None if
    absent or unreadable. `now` is unix time, for the HTTP-date form."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive result means no zone given
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), cap)


class WebhookSender:
    """Sends signed webhook POSTs over one shared connection pool. Use `async with` or
    start()/close().

    `socket_factory` is for tests: aiohttp calls it for every connection it opens, with the
    address it is about to connect to, so a test can prove a refused URL never got that far.
    """

    def __init__(
        self,
        *,
        allow_http: bool,
        allow_private: bool,
        timeout: float = 10.0,
        max_body: int = 65536,
        retry_after_cap: float = 3600.0,
        resolver: AbstractResolver | None = None,
        socket_factory: aiohttp.SocketFactoryType | None = None,
    ) -> None:
        self.allow_http = allow_http
        self.allow_private = allow_private
        self.timeout = float(timeout)
        self.max_body = max_body
        self.retry_after_cap = retry_after_cap
        self._given_resolver = resolver
        self._socket_factory = socket_factory
        self._own_resolver: AbstractResolver | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=self._resolver(),
                limit=0,  # the delivery engine bounds concurrency per endpoint
                socket_factory=self._socket_factory,
            ),
            timeout=aiohttp.ClientTimeout(
                total=self.timeout, sock_connect=self.timeout, sock_read=self.timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    def _resolver(self) -> AbstractResolver | None:
        """The connector's resolver: guarded unless private addresses are allowed."""
        if self.allow_private:
            return self._given_resolver  # None: aiohttp's default, owned by the connector
        inner = self._given_resolver
        if inner is None:
            inner = self._own_resolver = aiohttp.DefaultResolver()
        return GuardedResolver(inner)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_resolver is not None:
            await self._own_resolver.close()
            self._own_resolver = None

    async def __aenter__(self) -> WebhookSender:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(
        self, url: str, msg_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]
    ) -> Attempt:
        """POST `body` to `url`, signed with every key; the outcome, whatever happens.

        Raises only CancelledError, and RuntimeError/ValueError for caller bugs (not started,
        no keys)."""
        if self._session is None:
            raise RuntimeError("WebhookSender.start() has not been called")
        headers = self._headers(msg_id, timestamp, body, keys)  # no keys: a caller bug, raised
        return await self.post(url, body, headers)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Attempt:
        """POST `body` with these headers (a provider call: its own auth), guarded the same way."""
        if self._session is None:
            raise RuntimeError("WebhookSender.start() has not been called")
        started = time.monotonic()
        try:
            return await self._post(self._session, url, {"user-agent": USER_AGENT, **headers}, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to record, not a crash
            arrived = not isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
            return Attempt(None, _since(started), _describe(exc, self.timeout), None, "", arrived)

    @staticmethod
    def _headers(msg_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> dict[str, str]:
        if not keys:
            raise ValueError("at least one signing key is needed")
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(sign_standard_webhook(k, msg_id, timestamp, body) for k in keys),
        }

    async def _post(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
    ) -> Attempt:
        started = time.monotonic()
        problem = check_url(url, allow_http=self.allow_http, allow_private=self.allow_private)
        if problem is not None:
            return Attempt(None, _since(started), REFUSED + problem, None, "", may_have_arrived=False)
        # yarl parses the same string the same way check_url did: the URL checked is the URL used.
        async with session.post(URL(url), data=body, headers=headers, allow_redirects=False) as resp:
            text = (await _read_at_most(resp.content, self.max_body)).decode("utf-8", errors="replace")
            latency = _since(started)
            return Attempt(resp.status, latency, _status_error(resp), self._retry_after(resp), text)

    def _retry_after(self, resp: aiohttp.ClientResponse) -> float | None:
        if resp.status not in (429, 503):
            return None
        value = resp.headers.get("retry-after")
        return parse_retry_after(value, now=time.time(), cap=self.retry_after_cap)


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """At most `limit` bytes of a body; the rest is never read (the connection is then closed)."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = await stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _status_error(resp: aiohttp.ClientResponse) -> str | None:
    if 200 <= resp.status < 300:
        return None
    if 300 <= resp.status < 400:
        location = resp.headers.get("location")
        where = f"to {location}" if location else "without Location"
        return _short(f"redirect not followed ({resp.status} {where})")
    return f"HTTP {resp.status}"


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a failure with no usable response."""
    refused = _find_cause(exc, SSRFRefused)
    if refused is not None:
        return _short(REFUSED + str(refused))
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return f"timeout after {timeout}s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return _short(f"TLS certificate not accepted: {exc.certificate_error}")
    if isinstance(exc, aiohttp.ClientSSLError):
        return _short(f"TLS error: {exc.os_error}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _short(f"DNS lookup failed for {exc.host}: {exc.os_error.strerror or exc.os_error}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _connect_error(exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection without a response"
    return _short(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _connect_error(exc: aiohttp.ClientConnectorError) -> str:
    if exc.os_error.errno == errno.ECONNREFUSED:
        return "connection refused"
    return _short(f"connection failed: {exc.os_error.strerror or exc.os_error}")


def _find_cause(exc: BaseException, kind: type[_E]) -> _E | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _short(text: str) -> str:
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


def _since(started: float) -> float:
    return (time.monotonic() - started) * 1000.0
