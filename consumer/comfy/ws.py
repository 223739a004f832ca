"""The one WebSocket of a `ComfyClient`: connect, read typed events, reconnect with backoff.

The server sends no pings and replays nothing, so the socket pings (aiohttp heartbeat) to
notice a silent peer, and after every (re)connect calls `on_open`, where the client
reconciles its outstanding prompts over HTTP. While the socket is down, `on_down` is told
for how long after each failed attempt, so the client can give up on its prompts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson

from consumer.comfy.messages import Event, parse_event

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.05


@dataclass(frozen=True, slots=True)
class SocketHooks:
    """What the socket tells its owner."""

    on_event: Callable[[Event], None]
    on_open: Callable[[], Awaitable[None]]
    on_down: Callable[[float], None]  # seconds the socket has been down so far


class ComfySocket:
    """Reads `/ws?clientId=...` until cancelled, reconnecting with capped exponential backoff."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ws_url: str,
        hooks: SocketHooks,
        *,
        reconnect_max_s: float,
        heartbeat_s: float,
    ) -> None:
        self._session = session
        self._url = ws_url
        self._hooks = hooks
        self._reconnect_max_s = reconnect_max_s
        self._heartbeat_s = heartbeat_s
        self._connected = asyncio.Event()
        self._down_since: float | None = time.monotonic()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        """True once the socket is open (and reconciled), False after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Connect, read, reconnect; returns only by cancellation."""
        attempt = 0
        try:
            while True:
                opened = await self._session_once()
                attempt = 0 if opened else attempt + 1
                self._mark_down()
                await asyncio.sleep(self._backoff_s(attempt))
        finally:
            self._connected.clear()

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(self._reconnect_max_s, _FIRST_BACKOFF_S * 2.0**attempt)
        return ceiling * random.uniform(0.5, 1.0)

    def _mark_down(self) -> None:
        self._connected.clear()
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        self._hooks.on_down(now - self._down_since)

    async def _session_once(self) -> bool:
        """One connection's lifetime; True if it opened at all."""
        try:
            async with self._session.ws_connect(
                self._url, heartbeat=self._heartbeat_s, max_msg_size=0, autoping=True
            ) as ws:
                await self._opened()
                await self._read(ws)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("websocket %s: %s: %s", self._url, type(exc).__name__, exc)
        return self._down_since is None

    async def _opened(self) -> None:
        await self._hooks.on_open()
        self._down_since = None
        self._connected.set()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self._dispatch(message.data)
        log.info("websocket %s closed (code %s)", self._url, ws.close_code)

    def _dispatch(self, text: str) -> None:
        try:
            event = parse_event(orjson.loads(text))
        except orjson.JSONDecodeError:
            return
        if event is not None:
            self._hooks.on_event(event)
