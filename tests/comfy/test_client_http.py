"""ComfyClient against minimal fake servers: HTTP timeouts, without the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from consumer.comfy import ComfyClient
from consumer.errors import InstanceUnavailable
from tests.comfy.helpers import FAST, invert_prompt


@contextlib.asynccontextmanager
async def fake_comfy(*routes: web.RouteDef) -> AsyncIterator[str]:
    """A minimal fake ComfyUI: a WebSocket that stays open plus the given routes."""

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.add_routes([web.get("/ws", socket), *routes])
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
