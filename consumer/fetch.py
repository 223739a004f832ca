"""Download an input image over http(s), behind an SSRF guard and hard limits.

The guard runs twice for every hop, initial URL and each redirect:

* on the URL (`UrlGuard.check_url`): scheme, userinfo, and IP-literal hosts;
* at connect time (`GuardedResolver`): every address a host name resolves to is
  checked, and only allowed ones reach the connector, so a DNS answer that changes
  between the check and the connection (rebinding) cannot slip through.

URLs with userinfo (`http://user:pass@host/`) are refused: credentials in a task message
end up in logs and events, and `http://trusted@evil/` is a classic way to mislead a
reader about the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from consumer.errors import ImageDownloadFailed, ImageTooLarge, ImageUrlForbidden

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

MIB = 1024 * 1024
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ALLOWED_SCHEMES = frozenset({"http", "https"})
USER_AGENT = "style-consumer (image fetch)"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_REASONS: tuple[tuple[str, str], ...] = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


def display_url(url: URL) -> str:
    """The URL for messages: no userinfo, query or fragment (they may hold secrets)."""
    bare = url.with_query(None).with_fragment(None)
    return str(bare.with_user(None) if bare.absolute else bare)


def _embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), if any."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def why_forbidden(addr: IPAddress) -> str | None:
    """Why the guard refuses `addr` (loopback, private, ...), or None when it is public."""
    embedded = _embedded_ipv4(addr)
    if embedded is not None:
        reason = why_forbidden(embedded)
        return None if reason is None else f"{reason}, via {embedded}"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "carrier-grade NAT"
    for attribute, reason in _REASONS:
        if getattr(addr, attribute):
            return reason
    return None if addr.is_global else "not globally routable"


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _is_legacy_ipv4(host: str) -> bool:
    """True for numeric forms like `2130706433`, `0x7f.1` or `127.1` that resolve to IPs."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class UrlGuard:
    """Which URLs and addresses may be fetched: public ones, plus explicit exceptions."""

    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()

    def trusts(self, host: str) -> bool:
        """True when `host` skips the address checks (allowlisted, or private allowed)."""
        return self.allow_private or host.lower().rstrip(".") in self.allowed_hosts

    def check_url(self, url: URL) -> None:
        """Refuse a URL by scheme, userinfo or IP-literal host (names are checked later)."""
        if url.scheme not in ALLOWED_SCHEMES:
            raise ImageUrlForbidden(
                f"{display_url(url)}: scheme {url.scheme!r} is not allowed (http, https only)"
            )
        host = url.host
        if not host:
            raise ImageUrlForbidden(f"{display_url(url)}: the URL names no host")
        if url.user is not None or url.password is not None:
            raise ImageUrlForbidden(f"{display_url(url)}: credentials in the URL are refused")
        if not self.trusts(host):
            self._check_literal(host)

    def _check_literal(self, host: str) -> None:
        addr = _ip_literal(host)
        if addr is None:
            if _is_legacy_ipv4(host):
                raise ImageUrlForbidden(f"host {host!r}: a non-canonical numeric IPv4 address")
            return
        reason = why_forbidden(addr)
        if reason is not None:
            raise ImageUrlForbidden(f"host {host!r} is a {reason} address")

    def filter_resolved(self, host: str, results: list[ResolveResult]) -> list[ResolveResult]:
        """The allowed subset of `host`'s addresses; ImageUrlForbidden when none is left."""
        if self.trusts(host):
            return results
        kept = [r for r in results if _result_reason(r) is None]
        if not kept and results:
            first = results[0]
            raise ImageUrlForbidden(
                f"host {host!r} resolves to {first['host']}, a {_result_reason(first)} address"
            )
        return kept


def _result_reason(result: ResolveResult) -> str | None:
    addr = _ip_literal(result["host"])
    return "unparseable" if addr is None else why_forbidden(addr)


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and drops every address the guard refuses."""

    def __init__(self, guard: UrlGuard, inner: AbstractResolver) -> None:
        self._guard = guard
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        return self._guard.filter_resolved(host, results)

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(resolver: GuardedResolver, connect_timeout_s: float) -> aiohttp.ClientSession:
    """A ClientSession whose connector only connects to addresses `resolver` lets through.

    IP literals bypass resolvers in aiohttp, so callers must also `guard.check_url()`
    every URL (the fetcher does it on each hop). The caller closes `resolver` after the
    session (aiohttp does not close a resolver it was given).
    """
    connector = aiohttp.TCPConnector(resolver=resolver)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,  # no proxy from the environment: it would bypass the guard
        auto_decompress=False,  # a gzip bomb stays compressed (and fails as not-an-image)
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )


class ImageFetcher:
    """Downloads input images. Use as `async with ImageFetcher(...) as fetcher`."""

    def __init__(
        self,
        *,
        max_bytes: int = 20 * MIB,
        connect_timeout_s: float = 5.0,
        total_timeout_s: float = 30.0,
        max_redirects: int = 3,
        allow_private: bool = False,
        allowed_hosts: Iterable[str] = (),
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.guard = UrlGuard(
            allow_private, frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        )
        self._max_bytes = max_bytes
        self._connect_timeout_s = connect_timeout_s
        self._total_timeout_s = total_timeout_s
        self._max_redirects = max_redirects
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._stack = AsyncExitStack()

    def __repr__(self) -> str:
        return (
            f"<ImageFetcher max_bytes={self._max_bytes} total_timeout_s={self._total_timeout_s}"
            f" max_redirects={self._max_redirects} allow_private={self.guard.allow_private}>"
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        """The guarded session (e.g. for presigned uploads to user-supplied URLs)."""
        if self._session is None:
            raise RuntimeError("ImageFetcher used outside `async with`")
        return self._session

    async def __aenter__(self) -> Self:
        inner = self._resolver if self._resolver is not None else DefaultResolver()
        resolver = GuardedResolver(self.guard, inner)
        self._stack.push_async_callback(resolver.close)
        session = guarded_session(resolver, self._connect_timeout_s)
        self._session = await self._stack.enter_async_context(session)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._session = None
        await self._stack.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body at `url`, after at most `max_redirects` guarded redirects."""
        start = _parse(url)
        try:
            async with asyncio.timeout(self._total_timeout_s):
                return await self._follow(start)
        except TimeoutError as exc:
            raise ImageDownloadFailed(
                f"GET {display_url(start)} did not finish within {self._total_timeout_s}s"
            ) from exc

    async def _follow(self, start: URL) -> bytes:
        url = start
        for _ in range(self._max_redirects + 1):
            self.guard.check_url(url)
            try:
                result = await self._get(url)
            except aiohttp.ClientError as exc:
                raise ImageDownloadFailed(
                    f"GET {display_url(url)} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(result, bytes):
                return result
            url = url.join(result)
        raise ImageDownloadFailed(
            f"GET {display_url(start)}: more than {self._max_redirects} redirects"
            f" (the last to {display_url(url)})"
        )

    async def _get(self, url: URL) -> bytes | URL:
        """The body, or the redirect target to follow next."""
        async with self.session.get(url, allow_redirects=False) as response:
            if response.status in REDIRECT_STATUSES:
                return _location(response, url)
            if not 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
                raise ImageDownloadFailed(
                    f"GET {display_url(url)} answered HTTP {response.status} {response.reason}"
                )
            return await self._read_body(response, url)

    async def _read_body(self, response: aiohttp.ClientResponse, url: URL) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            raise ImageTooLarge(
                f"{display_url(url)} declares {declared} bytes, over the limit of"
                f" {self._max_bytes} bytes"
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > self._max_bytes:
                raise ImageTooLarge(
                    f"{display_url(url)} sent more than the limit of {self._max_bytes} bytes"
                )
        return bytes(body)


def _parse(url: str) -> URL:
    try:
        return URL(url)
    except (ValueError, TypeError) as exc:
        raise ImageUrlForbidden(f"not a valid URL: {url[:200]!r} ({exc})") from exc


def _location(response: aiohttp.ClientResponse, url: URL) -> URL:
    location = response.headers.get("Location")
    if not location:
        raise ImageDownloadFailed(
            f"GET {display_url(url)} answered HTTP {response.status} without a Location"
        )
    try:
        return URL(location)
    except ValueError as exc:
        raise ImageDownloadFailed(
            f"GET {display_url(url)} redirected to an invalid URL {location[:200]!r}"
        ) from exc
