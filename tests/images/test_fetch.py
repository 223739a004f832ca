"""ImageFetcher against a real loopback server: limits, redirects and the SSRF guard."""

from __future__ import annotations

import ipaddress
import re

import pytest
from yarl import URL

from consumer.errors import ImageDownloadFailed, ImageTooLarge, ImageUrlForbidden
from consumer.fetch import GuardedResolver, ImageFetcher, UrlGuard, display_url, why_forbidden

from .conftest import SECRET, FakeResolver, LoopbackServer

LOOPBACK = {"127.0.0.1"}


async def fetch(url: str, **options) -> bytes:
    async with ImageFetcher(**options) as fetcher:
        return await fetcher.fetch(url)


async def test_fetches_body_from_allowlisted_host(server: LoopbackServer):
    """An allowlisted loopback host serves the exact bytes."""
    assert await fetch(server.url("/image"), allowed_hosts=LOOPBACK) == server.body


async def test_allow_private_admits_loopback(server: LoopbackServer):
    """allow_private=True switches the address checks off."""
    assert await fetch(server.url("/image"), allow_private=True) == server.body


@pytest.mark.parametrize("status", [404, 500])
async def test_error_status_names_the_status(server: LoopbackServer, status: int):
    """A non-2xx answer fails the download and the message names the status."""
    with pytest.raises(ImageDownloadFailed, match=f"HTTP {status}"):
        await fetch(server.url(f"/status/{status}"), allowed_hosts=LOOPBACK)


@pytest.mark.parametrize("status", [403, 500])
async def test_error_answer_is_not_echoed(server: LoopbackServer, status: int):
    """A 4xx/5xx whose body and reason phrase hold a secret: the message has neither."""
    with pytest.raises(ImageDownloadFailed) as caught:
        await fetch(server.url(f"/secret/{status}?sig=x"), allowed_hosts=LOOPBACK)
    assert caught.value.message == f"GET {server.url(f'/secret/{status}')} answered HTTP {status}"


async def test_malformed_answer_names_only_the_exception_type(garbled: str):
    """aiohttp's text for a malformed header quotes it; the message keeps only the type."""
    with pytest.raises(ImageDownloadFailed) as caught:
        await fetch(f"{garbled}/image", allowed_hosts=LOOPBACK)
    assert caught.value.message == f"GET {garbled}/image failed: ClientResponseError"
    assert SECRET not in caught.value.message


async def test_follows_relative_redirect_chain_up_to_the_limit(server: LoopbackServer):
    """Three redirects are followed when max_redirects is 3."""
    body = await fetch(server.url("/redirect/2"), allowed_hosts=LOOPBACK, max_redirects=3)
    assert body == server.body
    assert server.paths == ["/redirect/2", "/redirect/1", "/redirect/0", "/image"]


async def test_too_many_redirects_fail(server: LoopbackServer):
    """A fourth redirect with max_redirects=3 fails, naming the limit."""
    with pytest.raises(ImageDownloadFailed, match="more than 3 redirects"):
        await fetch(server.url("/redirect/3"), allowed_hosts=LOOPBACK, max_redirects=3)
    assert "/image" not in server.paths


async def test_redirect_to_loopback_ip_is_refused(server: LoopbackServer):
    """A redirect from an allowlisted name to 127.0.0.1 is checked and refused."""
    url = server.url("/to?url=" + server.url("/image"), host="localhost")
    with pytest.raises(ImageUrlForbidden, match=r"'127\.0\.0\.1' is a loopback"):
        await fetch(url, allowed_hosts={"localhost"})
    assert server.paths == ["/to"]


async def test_redirect_to_metadata_service_is_refused(server: LoopbackServer):
    """A redirect to 169.254.169.254 (cloud metadata) is refused as link-local."""
    url = server.url("/to?url=http://169.254.169.254/latest/meta-data/")
    with pytest.raises(ImageUrlForbidden, match="link-local"):
        await fetch(url, allowed_hosts=LOOPBACK)


async def test_redirect_to_other_scheme_is_refused(server: LoopbackServer):
    """A redirect to file:// is refused by scheme."""
    with pytest.raises(ImageUrlForbidden, match="scheme 'file'"):
        await fetch(server.url("/to?url=file:///etc/passwd"), allowed_hosts=LOOPBACK)


async def test_name_resolving_to_loopback_is_refused_at_connect_time(server: LoopbackServer):
    """'localhost' is refused by what it resolves to, before any request is sent."""
    with pytest.raises(ImageUrlForbidden, match=r"'localhost' resolves to .*loopback"):
        await fetch(server.url("/image", host="localhost"))
    assert server.paths == []


async def test_rebinding_answer_is_refused_at_connect_time(server: LoopbackServer):
    """A public-looking name whose DNS answer is private never gets a connection."""
    resolver = FakeResolver({"images.example.com": ["127.0.0.1"]})
    url = server.url("/image", host="images.example.com")
    with pytest.raises(ImageUrlForbidden, match=r"images.example.com"):
        await fetch(url, resolver=resolver)
    assert resolver.asked == ["images.example.com"]
    assert server.paths == []


async def test_allowlisted_name_may_resolve_to_loopback(server: LoopbackServer):
    """An allowlisted host name is fetched even though it resolves to a private address."""
    resolver = FakeResolver({"images.internal": ["127.0.0.1"]})
    url = server.url("/image", host="images.internal")
    assert await fetch(url, resolver=resolver, allowed_hosts={"Images.Internal."}) == server.body


async def test_guarded_resolver_keeps_only_public_addresses():
    """Of a mixed public/private answer only the public addresses reach the connector."""
    inner = FakeResolver({"mixed.example": ["10.0.0.7", "93.184.216.34", "::1"]})
    results = await GuardedResolver(UrlGuard(), inner).resolve("mixed.example", 80)
    assert [r["host"] for r in results] == ["93.184.216.34"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1]:8080/x", "loopback"),
        ("http://[::ffff:127.0.0.1]/x", "loopback, via 127.0.0.1"),
        ("http://[::ffff:169.254.169.254]/x", "link-local"),
        ("http://0.0.0.0/x", "unspecified"),
        ("http://10.1.2.3/x", "private"),
        ("http://100.64.0.1/x", "carrier-grade NAT"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://2130706433/x", "non-canonical numeric"),
        ("http://0x7f.1/x", "non-canonical numeric"),
        ("ftp://example.com/x", "scheme 'ftp'"),
        ("http://user:secret@example.com/x", "credentials"),
        ("/relative/path", "scheme ''"),
    ],
)
async def test_refused_urls_name_the_reason(url: str, reason: str):
    """IP literals, odd schemes and userinfo are refused before any connection."""
    with pytest.raises(ImageUrlForbidden, match=re.escape(reason)):
        await fetch(url)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.100.100.200", "carrier-grade NAT"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private, via 10.0.0.1"),
        ("2002:7f00:1::", "loopback, via 127.0.0.1"),
        ("64:ff9b::a9fe:a9fe", "link-local, via 169.254.169.254"),
    ],
)
def test_why_forbidden_names_the_class(address: str, reason: str):
    """Every non-public address class is refused with its name."""
    assert why_forbidden(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_why_forbidden_admits_public_addresses(address: str):
    """Public IPv4 and IPv6 addresses (also IPv4-mapped) pass."""
    assert why_forbidden(ipaddress.ip_address(address)) is None


async def test_declared_length_over_limit_is_refused_early(server: LoopbackServer):
    """A Content-Length over max_bytes fails before the body is read."""
    with pytest.raises(ImageTooLarge, match="declares 1000000000000 bytes"):
        await fetch(server.url("/declared-huge"), allowed_hosts=LOOPBACK, max_bytes=1000)


async def test_endless_chunked_body_is_cut_at_the_limit(server: LoopbackServer):
    """A chunked body that never ends fails once it passes max_bytes."""
    with pytest.raises(ImageTooLarge, match="more than the limit of 262144 bytes"):
        await fetch(server.url("/endless"), allowed_hosts=LOOPBACK, max_bytes=256 * 1024)


async def test_compressed_bodies_are_not_inflated(server: LoopbackServer):
    """The fetcher asks for identity and never inflates a gzip body (no gzip bombs)."""
    body = await fetch(server.url("/gzip"), allowed_hosts=LOOPBACK, max_bytes=10_000)
    assert body.startswith(b"\x1f\x8b")
    assert server.accept_encoding == "identity"


async def test_slow_loris_hits_the_total_timeout(server: LoopbackServer):
    """A server trickling bytes forever is cut off by the total timeout."""
    with pytest.raises(ImageDownloadFailed, match=r"did not finish within 0\.3s"):
        await fetch(server.url("/slow"), allowed_hosts=LOOPBACK, total_timeout_s=0.3)


async def test_connection_refused_fails_the_download(unused_port: int):
    """Nobody listening is a download failure naming the URL."""
    url = f"http://127.0.0.1:{unused_port}/image"
    with pytest.raises(ImageDownloadFailed, match=f"GET {url} failed"):
        await fetch(url, allowed_hosts=LOOPBACK)


async def test_messages_hide_query_strings(server: LoopbackServer):
    """Error messages drop the query string, which may carry a signature."""
    with pytest.raises(ImageDownloadFailed) as caught:
        await fetch(server.url("/status/404?X-Amz-Signature=secret"), allowed_hosts=LOOPBACK)
    assert "secret" not in caught.value.message


def test_display_url_strips_credentials_and_query():
    """display_url keeps scheme, host, port and path only."""
    url = URL("https://u:p@host.example:8443/a/b.jpg?sig=1#frag")
    assert display_url(url) == "https://host.example:8443/a/b.jpg"


async def test_fetch_outside_context_is_a_programming_error():
    """Using the fetcher without entering it raises RuntimeError, not a task error."""
    with pytest.raises(RuntimeError, match="async with"):
        await ImageFetcher(allowed_hosts=LOOPBACK).fetch("http://127.0.0.1:1/x")


def test_repr_shows_limits():
    """The repr names the limits, for logs."""
    assert "max_redirects=3" in repr(ImageFetcher())
