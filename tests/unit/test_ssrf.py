"""Tests for channels.ssrf: which addresses and webhook URLs are refused, and why."""

from __future__ import annotations

import ipaddress

import pytest

from channels.ssrf import check_url, forbidden_reason

FORBIDDEN_ADDRESSES = {
    "127.0.0.1": "loopback",
    "127.255.0.9": "loopback",
    "::1": "loopback",
    "10.0.0.1": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",
    "100.64.0.1": "CGNAT",
    "100.127.255.254": "CGNAT",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "::ffff:127.0.0.1": "loopback",
    "::ffff:10.0.0.1": "private",
    "::ffff:169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "192.0.2.1": "not globally routable",  # documentation (TEST-NET-1)
    "198.18.0.1": "not globally routable",  # benchmarking
    "2001:db8::1": "not globally routable",  # documentation
    "64:ff9b::7f00:1": "loopback",  # NAT64 of 127.0.0.1
    "2002:a00:1::": "private",  # 6to4 of 10.0.0.1
}
PUBLIC_ADDRESSES = ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "expected"), FORBIDDEN_ADDRESSES.items())
def test_forbidden_addresses_have_a_reason(address: str, expected: str) -> None:
    reason = forbidden_reason(ipaddress.ip_address(address))
    assert reason is not None and expected in reason


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_cgnat_is_refused_although_python_does_not_call_it_private() -> None:
    ip = ipaddress.ip_address("100.64.0.1")
    assert not ip.is_private  # why the module checks 100.64.0.0/10 itself
    assert forbidden_reason(ip) == "shared address space (CGNAT)"


REFUSED_URLS = {
    "https://127.0.0.1/": "127.0.0.1 is loopback",
    "https://localhost/": "localhost is loopback",
    "https://LocalHost./hook": "localhost is loopback",
    "https://api.localhost/": "api.localhost is loopback",
    "https://[::1]/": "::1 is loopback",
    "https://10.0.0.1/": "10.0.0.1 is private",
    "https://172.16.0.1/": "172.16.0.1 is private",
    "https://172.31.255.255/": "172.31.255.255 is private",
    "https://192.168.1.1/": "192.168.1.1 is private",
    "https://169.254.169.254/latest/meta-data/": "169.254.169.254 is link-local",
    "https://100.64.0.1/": "100.64.0.1 is shared address space (CGNAT)",
    "https://0.0.0.0/": "0.0.0.0 is unspecified",
    "https://[::ffff:127.0.0.1]/": "loopback (embedded IPv4 127.0.0.1)",
    "https://[fe80::1]/": "fe80::1 is link-local",
    "https://[fc00::1]/": "fc00::1 is private",
    "https://224.0.0.1/": "224.0.0.1 is multicast",
}


@pytest.mark.parametrize(("url", "expected"), REFUSED_URLS.items())
def test_private_destinations_are_refused(url: str, expected: str) -> None:
    reason = check_url(url, allow_http=True, allow_private=False)
    assert reason is not None and expected in reason


@pytest.mark.parametrize("url", ["https://127.0.0.1:8443/hook", "https://localhost/", "http://[::1]:80/"])
def test_allow_private_lets_loopback_through(url: str) -> None:
    assert check_url(url, allow_http=True, allow_private=True) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://93.184.215.14/hook",
        "https://[2606:4700::1111]/",
        "https://example.com/webhooks?tenant=1",
        "https://example.com:8443/",
        "https://example.com./",
        "https://bücher.example/",
    ],
)
def test_public_https_urls_are_accepted(url: str) -> None:
    assert check_url(url, allow_http=False, allow_private=False) is None


def test_http_is_refused_unless_allowed() -> None:
    assert check_url("http://example.com/", allow_http=False, allow_private=False) == (
        "scheme http is not allowed (https only)"
    )
    assert check_url("http://example.com/", allow_http=True, allow_private=False) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pass@example.com/", "userinfo"),
        ("https://user@example.com/", "userinfo"),
        ("ftp://example.com/", "scheme 'ftp'"),
        ("file:///etc/passwd", "absolute"),
        ("javascript:alert(1)", "absolute"),
        ("example.com/hook", "absolute"),
        ("https://", "absolute"),
        ("", "absolute"),
        ("https://example.com/#frag", "fragment"),
        ("https://[::1/", "malformed"),
        ("https://example.com:99999/", "malformed"),
        ("https://example.com:0/", "port 0"),
        ("https://exa mple.com/", "whitespace"),
        (" https://example.com/", "whitespace"),
        ("https://example.com/\r\nX-Injected: 1", "control"),
        ("https://127.1/", "not a canonical IP address"),
        ("https://2130706433/", "not a canonical IP address"),
        ("https://0x7f.0.0.1/", "not a canonical IP address"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://example.com/" + "a" * 3000, "longer than"),
    ],
)
def test_malformed_or_unsafe_urls_are_refused(url: str, expected: str) -> None:
    for allow_private in (False, True):
        reason = check_url(url, allow_http=False, allow_private=allow_private)
        assert reason is not None and expected in reason, (url, reason)
