"""ComfyClient against minimal fake servers: HTTP timeouts and redirects, no emulator."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from consumer.comfy import ComfyClient, OutputImage
from consumer.errors import InstanceUnavailable
from tests.comfy.helpers import FAST, invert_prompt

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def open_socket(request: web.Request) -> web.WebSocketResponse:
    """A WebSocket that stays open until the client leaves."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for _ in ws:
        pass
    return ws


@contextlib.asynccontextmanager
async def fake_comfy(*routes: web.RouteDef, ws: Handler = open_socket) -> AsyncIterator[str]:
    """A minimal fake ComfyUI: a WebSocket (open by default) plus the given routes."""
    app = web.Application()
    app.add_routes([web.get("/ws", ws), *routes])
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_http_timeout_is_unavailable() -> None:
    """A server that accepts but never answers: InstanceUnavailable after request_s."""
    never = asyncio.Event()

    async def stall(_request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    timeouts = dataclasses.replace(FAST, request_s=0.2)
    async with (
        fake_comfy(web.get("/system_stats", stall)) as url,
        ComfyClient(url, timeouts=timeouts) as comfy,
    ):
        with pytest.raises(InstanceUnavailable, match="TimeoutError"):
            await comfy.system_stats()
        never.set()


async def test_submit_that_timed_out_is_withdrawn() -> None:
    """POST /prompt times out (it may have queued): the client deletes/interrupts that id."""
    never = asyncio.Event()
    withdrawn: list[str] = []

    async def stall(_request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    async def delete(request: web.Request) -> web.Response:
        withdrawn.extend((await request.json())["delete"])
        return web.Response()

    async def interrupt(request: web.Request) -> web.Response:
        withdrawn.append((await request.json())["prompt_id"])
        return web.Response()

    routes = (
        web.post("/prompt", stall),
        web.post("/queue", delete),
        web.post("/interrupt", interrupt),
    )
    timeouts = dataclasses.replace(FAST, request_s=0.2)
    async with fake_comfy(*routes) as url, ComfyClient(url, timeouts=timeouts) as comfy:
        with pytest.raises(InstanceUnavailable, match="TimeoutError"):
            await comfy.submit(invert_prompt("x.png"))
        never.set()
    assert len(withdrawn) == 2
    assert withdrawn[0] == withdrawn[1]
    assert comfy.outstanding == 0


@contextlib.asynccontextmanager
async def elsewhere() -> AsyncIterator[tuple[str, list[str]]]:
    """Another server a redirect could point to: answers everything, records every path."""
    hits: list[str] = []

    async def anything(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        return await open_socket(request) if request.path == "/ws" else web.json_response({})

    async with fake_comfy(web.route("*", "/{tail:.*}", anything), ws=anything) as url:
        yield url, hits


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_http_redirect_is_not_followed(status: int) -> None:
    """A 3xx from ComfyUI is an unexpected answer: InstanceUnavailable, the target never asked."""

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{target}{request.path}"})

    routes = (web.get("/system_stats", redirect), web.get("/view", redirect))
    async with (
        elsewhere() as (target, hits),
        fake_comfy(*routes) as url,
        ComfyClient(url, timeouts=FAST) as comfy,
    ):
        with pytest.raises(InstanceUnavailable, match=f"answered {status}"):
            await comfy.system_stats()
        with pytest.raises(InstanceUnavailable, match=f"answered {status}"):
            await comfy.view(OutputImage("out.png"))
    assert hits == []


async def test_websocket_redirect_is_not_followed() -> None:
    """A 307 on the WebSocket handshake is refused; the client retries the instance itself."""
    retried = asyncio.Event()
    attempts: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        attempts.append(request.path)
        if len(attempts) >= 2:  # a second attempt: the refusal was survived
            retried.set()
        raise web.HTTPTemporaryRedirect(f"{target}/ws")

    async with (
        elsewhere() as (target, hits),
        fake_comfy(ws=redirect) as url,
        ComfyClient(url, timeouts=FAST) as comfy,
    ):
        async with asyncio.timeout(5):
            await retried.wait()
        assert not comfy.connected
    assert hits == []
