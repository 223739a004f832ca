"""WebSocket side of the emulator: /ws, per-client routing and broadcasts (PromptServer.send)."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)


class SocketHub:
    """Open sockets by client id, plus what the running prompt tells a reconnecting client."""

    def __init__(self, queue_info: Callable[[], dict[str, Any]], features: dict[str, Any]) -> None:
        self._queue_info = queue_info
        self._features = features
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.client_id: str | None = None
        """client_id of the prompt now executing (PromptServer.client_id)."""
        self.last_node_id: str | None = None

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """GET /ws?clientId=...: status (+ bare executing on reconnect), then read client frames."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        try:
            await self.send("status", {"status": self._queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            await self._read(ws, sid)
        finally:
            # ComfyUI's quirk, kept on purpose: a late close of an old socket with the same
            # clientId unregisters the newer one.
            self.sockets.pop(sid, None)
        return ws

    async def _read(self, ws: web.WebSocketResponse, sid: str) -> None:
        first = True
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            with contextlib.suppress(ValueError, AttributeError):
                data = json.loads(msg.data)
                if first and data.get("type") == "feature_flags":
                    await self.send("feature_flags", dict(self._features), sid)
            first = False

    async def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """To one client (dropped when it is not connected) or, with sid None, to all."""
        message = {"type": event, "data": data}
        if sid is None:
            targets = list(self.sockets.values())
        else:
            targets = [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            try:
                await ws.send_json(message)
            except (ConnectionError, RuntimeError) as ex:
                log.debug("dropping %s for a closing socket: %s", event, ex)

    async def close_all(self) -> None:
        for ws in list(self.sockets.values()):
            await ws.close()
