"""Which webhook destinations Parley refuses, so a tenant cannot point us at our own network.

Outgoing webhooks POST to URLs that tenants register. Without a guard, a URL such as
http://169.254.169.254/latest/meta-data/ or https://10.0.0.5:9200/ turns Parley into a proxy
into the network it runs in (server-side request forgery). This module holds the two pure
decisions (no IO):

- `forbidden_reason(ip)`: is this address one we must never connect to, and why.
- `check_url(url, ...)`: is this URL acceptable to register (scheme, userinfo, localhost, IP
  literals, malformed input).

A host *name* that resolves to a private address cannot be judged here: DNS can answer
differently at send time (rebinding). The sender (agents/webhook_client.py) therefore checks
every resolved address again at connect time, and connects only to the addresses it checked.
Both places call `forbidden_reason`, so they agree on what "private" means.
"""

from __future__ import annotations

import ipaddress
import re

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048

# Python's `ipaddress` does not put 100.64.0.0/10 (RFC 6598 shared address space, used by
# carrier-grade NAT and by some clouds for internal services) under is_private; check it here.
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")
# NAT64 (RFC 6052) embeds an IPv4 address in the low 32 bits; judge the embedded address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# A host whose last label is a number (e.g. 127.1, 2130706433, 0x7f.1) is an IPv4 address in
# a legacy notation that getaddrinfo (inet_aton) still maps onto an address. Refuse it outright
# rather than guess which address it means.
_NUMERIC_LAST_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be connected to (e.g. "loopback", "private"), or None if it is public."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        reason = forbidden_reason(embedded)
        return None if reason is None else f"{reason} (embedded IPv4 {embedded})"
    return _own_reason(ip)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # (server, client): the client is where packets end up
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _own_reason(ip: IPAddress) -> str | None:
    """The reason for an address judged by its own range (no embedded IPv4)."""
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "shared address space (CGNAT)"),
        (ip.is_multicast, "multicast"),
        (_is_rfc1918_or_ula(ip), "private"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "special-purpose (not globally routable)"),
        (not ip.is_global, "not globally routable"),
    )
    return next((reason for hit, reason in checks if hit), None)


def _is_rfc1918_or_ula(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv4Address):
        return any(ip in net for net in _RFC1918)
    return ip in _UNIQUE_LOCAL


def check_url(url: str | URL, *, allow_http: bool, allow_private: bool) -> str | None:
    """Why a webhook URL must be refused, or None if it is acceptable.

    `allow_http` admits http:// (tests, local development); `allow_private` admits localhost
    and private IP literals. Names are not resolved here.
    """
    if isinstance(url, str):
        if len(url) > MAX_URL_LENGTH:
            return f"URL is longer than {MAX_URL_LENGTH} characters"
        if _CONTROL_OR_SPACE.search(url):
            return "URL contains whitespace or control characters"
        try:
            url = URL(url)
        except (ValueError, TypeError) as exc:
            return f"malformed URL ({exc})"
    return _scheme_problem(url, allow_http) or _authority_problem(url) or _host_problem(url, allow_private)


def _scheme_problem(url: URL, allow_http: bool) -> str | None:
    if not url.absolute:
        return "URL must be absolute (https://host/path)"
    if url.scheme == "https" or (url.scheme == "http" and allow_http):
        return None
    if url.scheme == "http":
        return "scheme http is not allowed (https only)"
    return f"scheme {url.scheme!r} is not allowed (https only)"


def _authority_problem(url: URL) -> str | None:
    if "@" in (url.raw_authority or ""):
        return "userinfo (user:password@) is not allowed in the URL"
    if url.raw_fragment:
        return "a fragment (#...) is not allowed in the URL"
    try:
        port = url.port
    except ValueError:
        return "malformed URL (invalid port)"
    if port == 0:
        return "port 0 is not allowed"
    return None


def _host_problem(url: URL, allow_private: bool) -> str | None:
    host = (url.raw_host or "").rstrip(".").lower()
    if not host:
        return "URL has no host"
    if "%" in host:
        return "IPv6 zone identifiers are not allowed in the host"
    ip = _ip_literal(host)
    if ip is None and _NUMERIC_LAST_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return f"host {host!r} is not a canonical IP address or a name"
    if allow_private:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is loopback"
    if ip is not None:
        reason = forbidden_reason(ip)
        return None if reason is None else f"{ip} is {reason}"
    return None


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
