"""Real loopback HTTP servers with scripted misbehaviour, and image factories.

`server` (127.0.0.1) and `server_v6` ([::1]) play internal services; `public` listens on
127.0.0.2, which tests admit through the guard's `allowed_hosts` to play a public host.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

CHUNK = b"x" * 65536
SECRET = "s3cr3t-internal-token"  # what an internal answer holds; no message may echo it
PUBLIC_HOST = "127.0.0.2"  # a loopback address tests allowlist to play a public host


@dataclass
class Upload:
    path: str
    query: str
    content_type: str
    body: bytes


@dataclass
class LoopbackServer:
    """An aiohttp app on 127.0.0.1, port 0, recording what it was asked."""

    body: bytes
    host: str = "127.0.0.1"
    port: int = 0
    paths: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    accept_encoding: str = ""

    def url(self, path: str, host: str | None = None) -> str:
        name = host or self.host
        return f"http://{f'[{name}]' if ':' in name else name}:{self.port}{path}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/image", self._image)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/redirect/{hops}", self._redirect)
        app.router.add_get("/to", self._to)
        app.router.add_get("/declared-huge", self._declared_huge)
        app.router.add_get("/endless", self._endless)
        app.router.add_get("/slow", self._slow)
        app.router.add_put("/upload/{code}", self._upload)
        app.router.add_put("/stall", self._stall)
        app.router.add_route("*", "/hop/{code}", self._hop)
        app.router.add_route("*", "/chain/{code}/{hops}", self._chain)
        app.router.add_route("*", "/secret/{code}", self._secret)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.paths.append(request.path)
        self.methods.append(request.method)
        return await handler(request)

    async def _image(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.body, content_type="image/png")

    async def _gzip(self, request: web.Request) -> web.Response:
        self.accept_encoding = request.headers.get("Accept-Encoding", "")
        body = gzip.compress(b"\0" * 1_000_000)  # a small bomb: 1 MB in about 1 kB
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def _redirect(self, request: web.Request) -> web.Response:
        hops = int(request.match_info["hops"])
        target = "/image" if hops == 0 else f"/redirect/{hops - 1}"  # relative Location
        raise web.HTTPFound(target)

    async def _to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])

    async def _declared_huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10**12
        await response.prepare(request)
        await response.write(b"x" * 10)
        await asyncio.Event().wait()  # hold the body open until the client leaves
        return response

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:
            await response.write(CHUNK)

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:  # slow-loris: a byte every 50 ms, forever
            await response.write(b"x")
            await asyncio.sleep(0.05)

    async def _upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.uploads.append(Upload(request.path, request.query_string, request.content_type, body))
        return web.Response(status=int(request.match_info["code"]), text=f"bucket says {SECRET}")

    async def _stall(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.Event().wait()  # never answer; the client's deadline ends it
        return web.Response()

    async def _hop(self, request: web.Request) -> web.Response:
        """Answer `code` with `Location: <to>` (no Location when `to` is absent)."""
        await request.read()
        to = request.query.get("to")
        headers = {} if to is None else {"Location": to}
        return web.Response(status=int(request.match_info["code"]), headers=headers)

    async def _chain(self, request: web.Request) -> web.Response:
        """`hops` redirects with status `code`, then on to PUT /upload/200 or GET /image."""
        await request.read()
        code, hops = int(request.match_info["code"]), int(request.match_info["hops"])
        last = "/upload/200" if request.method == "PUT" else "/image"
        target = last if hops == 0 else f"/chain/{code}/{hops - 1}"
        return web.Response(status=code, headers={"Location": target})

    async def _secret(self, request: web.Request) -> web.Response:
        """An error whose body and reason phrase hold SECRET."""
        await request.read()
        code = int(request.match_info["code"])
        return web.Response(status=code, reason=f"Nope {SECRET}", text=f"internal {SECRET}")


def png_bytes(size=(40, 30), color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@contextlib.asynccontextmanager
async def serving(host: str) -> AsyncIterator[LoopbackServer]:
    """A started server on `host`; handlers are cancelled when their client goes away."""
    state = LoopbackServer(body=png_bytes(), host=host)
    runner = web.AppRunner(state.app(), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
        state.port = runner.addresses[0][1]
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[LoopbackServer]:
    """A server on 127.0.0.1: an internal service unless a test allowlists it."""
    async with serving("127.0.0.1") as state:
        yield state


@pytest.fixture
async def server_v6() -> AsyncIterator[LoopbackServer]:
    """A server on [::1]: an internal service reached over IPv6."""
    async with serving("::1") as state:
        yield state


@pytest.fixture
async def public() -> AsyncIterator[LoopbackServer]:
    """A server on 127.0.0.2, the "public" host that tests allowlist."""
    async with serving(PUBLIC_HOST) as state:
        yield state


@pytest.fixture
async def garbled() -> AsyncIterator[str]:
    """A raw TCP server whose every answer has a malformed header quoting SECRET."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: 1{SECRET}\r\n\r\n".encode())
            await writer.drain()
        writer.close()

    raw = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with raw:
        yield f"http://127.0.0.1:{raw.sockets[0].getsockname()[1]}"


class FakeResolver(AbstractResolver):
    """DNS from a dict: host name -> addresses (a rebinding attacker's answers)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        del family  # the fake answers every family alike
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers[host]
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
def unused_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
