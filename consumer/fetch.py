"""Outbound HTTP to user-supplied URLs, behind an SSRF guard and hard limits.

`GuardedClient` sends every such request (the input image's GET, the result's presigned
PUT) with `allow_redirects=False` and follows redirects by hand, so the guard runs for
every hop, initial URL and each redirect:

* on the URL (`UrlGuard.check_url`): scheme, userinfo, and IP-literal hosts;
* at connect time (`GuardedResolver`): every address a host name resolves to is
  checked, and only allowed ones reach the connector, so a DNS answer that changes
  between the check and the connection (rebinding) cannot slip through.

aiohttp's own redirect handling would skip the first check, and IP literals never reach a
resolver, so a redirect to `http://127.0.0.1/` would go out unchecked.

URLs with userinfo (`http://user:pass@host/`) are refused: credentials in a task message
end up in logs and events, and `http://trusted@evil/` is a classic way to mislead a
reader about the host.

Error messages end up in the `failed` event the sender reads, so they carry the URL (via
`display_url`), the status code and our own words only: never a response body, a reason
phrase, or an aiohttp exception's text (which may quote a remote header).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from consumer.errors import (
    ImageDownloadFailed,
    ImageTooLarge,
    ImageUrlForbidden,
    PermanentError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable, Mapping
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
    every URL (`GuardedClient` does it on each hop). The caller closes `resolver` after the
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


@dataclass(frozen=True, slots=True)
class GuardedClient:
    """Requests to user-supplied URLs: redirects followed by hand, every hop guarded.

    `session` must be a `guarded_session` over a `GuardedResolver` of the same `guard`.
    """

    session: aiohttp.ClientSession
    guard: UrlGuard
    max_redirects: int

    @asynccontextmanager
    async def open(
        self,
        method: str,
        url: URL,
        *,
        follow: frozenset[int] = REDIRECT_STATUSES,
        failure: type[PermanentError] = ImageDownloadFailed,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The first answer whose status is not in `follow`, after at most `max_redirects` hops.

        Each hop re-sends `method`, `data` and `headers` to the Location, once the guard
        admits it. A refused hop raises ImageUrlForbidden; a failed one, too many
        redirects or a bad Location raise `failure`.
        """
        req = _Request(method, url, follow, failure, data, headers)
        response = await self._follow(req)
        async with response:
            yield response

    async def _follow(self, req: _Request) -> aiohttp.ClientResponse:
        url, came_from = req.start, None
        for _ in range(self.max_redirects + 1):
            response = await self._send(req, url, came_from)
            if response.status not in req.follow:
                return response
            async with response:  # released before the next hop
                url, came_from = _location(response, req, url), url
        raise req.failure(
            f"{req.method} {display_url(req.start)}: more than {self.max_redirects} redirects"
            f" (the last to {display_url(url)})"
        )

    async def _send(self, req: _Request, url: URL, came_from: URL | None) -> aiohttp.ClientResponse:
        try:
            self.guard.check_url(url)
            return await self.session.request(
                req.method, url, data=req.data, headers=req.headers, allow_redirects=False
            )
        except ImageUrlForbidden as exc:  # from check_url, or the resolver at connect time
            if came_from is None:
                raise
            raise ImageUrlForbidden(
                f"{req.method} {display_url(came_from)}: the redirect target was refused:"
                f" {exc.message}"
            ) from exc
        except aiohttp.ClientError as exc:
            raise req.failure(failed_message(req.method, url, exc)) from exc


@dataclass(frozen=True, slots=True)
class _Request:
    """What every hop of one request re-sends, and how its redirects end."""

    method: str
    start: URL
    follow: frozenset[int]
    failure: type[PermanentError]
    data: bytes | None
    headers: Mapping[str, str] | None


def failed_message(method: str, url: URL, exc: aiohttp.ClientError) -> str:
    """`exc` as a message: its type only, as its text may quote remote data (a header)."""
    return f"{method} {display_url(url)} failed: {type(exc).__name__}"


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
        self._client: GuardedClient | None = None
        self._stack = AsyncExitStack()

    def __repr__(self) -> str:
        return (
            f"<ImageFetcher max_bytes={self._max_bytes} total_timeout_s={self._total_timeout_s}"
            f" max_redirects={self._max_redirects} allow_private={self.guard.allow_private}>"
        )

    @property
    def client(self) -> GuardedClient:
        """The guarded client (also for presigned uploads to user-supplied URLs)."""
        if self._client is None:
            raise RuntimeError("ImageFetcher used outside `async with`")
        return self._client

    async def __aenter__(self) -> Self:
        inner = self._resolver if self._resolver is not None else DefaultResolver()
        resolver = GuardedResolver(self.guard, inner)
        self._stack.push_async_callback(resolver.close)
        session = guarded_session(resolver, self._connect_timeout_s)
        session = await self._stack.enter_async_context(session)
        self._client = GuardedClient(session, self.guard, self._max_redirects)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client = None
        await self._stack.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body at `url`, after at most `max_redirects` guarded redirects."""
        start = _parse(url)
        try:
            async with asyncio.timeout(self._total_timeout_s):
                return await self._get(start)
        except TimeoutError as exc:
            raise ImageDownloadFailed(
                f"GET {display_url(start)} did not finish within {self._total_timeout_s}s"
            ) from exc

    async def _get(self, start: URL) -> bytes:
        async with self.client.open("GET", start) as response:
            url = response.url
            if not 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
                raise ImageDownloadFailed(f"GET {display_url(url)} answered HTTP {response.status}")
            try:
                return await self._read_body(response, url)
            except aiohttp.ClientError as exc:
                raise ImageDownloadFailed(failed_message("GET", url, exc)) from exc

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


def _location(response: aiohttp.ClientResponse, req: _Request, url: URL) -> URL:
    """The next hop's URL, resolved against `url`; the header's text is never echoed."""
    location = response.headers.get("Location")
    where = f"{req.method} {display_url(url)} answered HTTP {response.status}"
    if not location:
        raise req.failure(f"{where} without a Location")
    try:
        return url.join(URL(location))
    except ValueError as exc:
        raise req.failure(f"{where} with an invalid Location") from exc
