"""A real loopback HTTP server with scripted misbehaviour, and image factories."""

from __future__ import annotations

import asyncio
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
    port: int = 0
    paths: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    accept_encoding: str = ""

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

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
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.paths.append(request.path)
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
        return web.Response(status=int(request.match_info["code"]), text="bucket says no")


def png_bytes(size=(40, 30), color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
async def server() -> AsyncIterator[LoopbackServer]:
    """A started loopback server; handlers are cancelled when their client goes away."""
    state = LoopbackServer(body=png_bytes())
    runner = web.AppRunner(state.app(), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


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
