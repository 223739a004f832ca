"""HTTP routes of the emulator (server.PromptServer), each served at /x and /api/x."""

from __future__ import annotations

import ipaddress
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from consumer.testing.emulator_executor import Executor
from consumer.testing.emulator_faults import Faults
from consumer.testing.emulator_files import upload_image, view
from consumer.testing.emulator_nodes import NodeEnv, NodeRegistry, object_info
from consumer.testing.emulator_queue import PromptQueue, QueueItem
from consumer.testing.emulator_validation import validate_prompt
from consumer.testing.emulator_ws import SocketHub

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COMFYUI_VERSION = "0.8.0"
FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
}
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
_INTERNAL_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"


def internal_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (e.g. malformed JSON)."""
    return web.Response(status=500, text=_INTERNAL_ERROR)


@web.middleware
async def crash_as_500(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        return internal_error()


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _origin_mismatch(request: web.Request) -> bool:
    """server.create_origin_only_middleware: loopback Host with a foreign Origin."""
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if not host or not origin:
        return False
    host_parts = urlsplit("//" + host.lower())
    origin_parts = urlsplit(origin.lower())
    host_domain = host.lower() if origin_parts.port is not None else host_parts.hostname
    origin_domain = origin_parts.netloc if host_parts.port is not None else origin_parts.hostname
    if not _is_loopback(host_parts.hostname) or not host_domain or not origin_domain:
        return False
    return host_domain != origin_domain


@web.middleware
async def origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _origin_mismatch(request):
        return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def _memory_bytes() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 16 << 30, 8 << 30


def system_stats() -> dict[str, Any]:
    total, free = _memory_bytes()
    system = {
        "os": sys.platform,
        "ram_total": total,
        "ram_free": free,
        "comfyui_version": COMFYUI_VERSION,
        "required_frontend_version": "1.35.9",
        "installed_templates_version": "0.7.67",
        "required_templates_version": "0.7.67",
        "python_version": sys.version,
        "pytorch_version": f"emulated ({platform.python_implementation()})",
        "embedded_python": False,
        "argv": ["main.py", "--cpu"],
    }
    device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free}
    device |= {"torch_vram_total": total, "torch_vram_free": free}
    return {"system": system, "devices": [device]}


def _no_prompt() -> web.Response:
    error: dict[str, Any] = {"type": "no_prompt", "message": "No prompt provided"}
    error |= {"details": "No prompt provided", "extra_info": {}}
    return web.json_response({"error": error, "node_errors": {}}, status=400)


@dataclass
class Routes:
    """The request handlers over one emulator's state."""

    queue: PromptQueue
    hub: SocketHub
    executor: Executor
    registry: NodeRegistry
    env: NodeEnv
    faults: Faults
    number: int = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[origin_only, crash_as_500], client_max_size=104857600)
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/ws", self.hub.handle),
            ("GET", "/prompt", self.get_prompt),
            ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue),
            ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.post_interrupt),
            ("POST", "/free", self.post_free),
            ("GET", "/history", self.get_history),
            ("GET", "/history/{prompt_id}", self.get_history_item),
            ("POST", "/history", self.post_history),
            ("GET", "/view", self.get_view),
            ("POST", "/upload/image", self.post_upload_image),
            ("GET", "/system_stats", self.get_system_stats),
            ("GET", "/features", self.get_features),
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info_node),
            ("GET", "/models", self.get_models),
            ("GET", "/models/{folder}", self.get_model_files),
            ("GET", "/embeddings", self.get_embeddings),
        ]
        for method, path, handler in table:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, f"/api{path}", handler)
        return app

    async def get_prompt(self, _request: web.Request) -> web.Response:
        return web.json_response(self.queue.queue_info())

    def _next_number(self, body: dict[str, Any]) -> float:
        if "number" in body:
            return float(body["number"])
        number = self.number
        self.number += 1
        return -number if body.get("front") else number

    async def post_prompt(self, request: web.Request) -> web.Response:
        if self.faults.reject_prompts_with_500:
            return internal_error()
        body = await request.json()
        number = self._next_number(body)
        if "prompt" not in body:
            return _no_prompt()
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        targets = body.get("partial_execution_targets")
        verdict = validate_prompt(self.registry, self.env, prompt, targets)
        extra: dict[str, Any] = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        if not verdict.ok:
            rejection = {"error": verdict.error, "node_errors": verdict.node_errors}
            return web.json_response(rejection, status=400)
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra.pop(key, None)
        extra["create_time"] = int(time.time() * 1000)
        await self.queue.put(QueueItem(number, prompt_id, prompt, extra, verdict.outputs))
        answer: dict[str, Any] = {"prompt_id": prompt_id, "number": number}
        answer["node_errors"] = verdict.node_errors
        return web.json_response(answer)

    async def get_queue(self, _request: web.Request) -> web.Response:
        running = [item.as_list() for item in self.queue.running.values()]
        pending = [item.as_list() for item in self.queue.pending()]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            await self.queue.clear()
        for prompt_id in body.get("delete", []):
            await self.queue.delete(prompt_id)
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id")
        running = {item.prompt_id for item in self.queue.running.values()}
        if not prompt_id or prompt_id in running:
            self.executor.interrupt()
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("free_memory", False):
            self.executor.free_memory()
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query["offset"]) if "offset" in query else -1
        return web.json_response(self.queue.get_history(max_items, offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.queue.history.get(prompt_id)
        return web.json_response({} if entry is None else {prompt_id: entry})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self.queue.history.clear()
        for prompt_id in body.get("delete", []):
            self.queue.history.pop(prompt_id, None)
        return web.Response(status=200)

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        return await view(request, self.env.dirs)

    async def post_upload_image(self, request: web.Request) -> web.Response:
        return await upload_image(request, self.env.dirs)

    async def get_system_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(system_stats())

    async def get_features(self, _request: web.Request) -> web.Response:
        return web.json_response(FEATURES)

    async def get_object_info(self, _request: web.Request) -> web.Response:
        infos = {name: object_info(node, self.env) for name in self.registry.names()
                 if (node := self.registry.get(name)) is not None}  # fmt: skip
        return web.json_response(infos)

    async def get_object_info_node(self, request: web.Request) -> web.Response:
        node = self.registry.get(request.match_info["node_class"])
        if node is None:
            return web.json_response({})
        return web.json_response({node.name: object_info(node, self.env)})

    async def get_models(self, _request: web.Request) -> web.Response:
        return web.json_response(["checkpoints", "embeddings", "loras", "vae"])

    async def get_model_files(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder == "checkpoints":
            return web.json_response(sorted(self.env.checkpoints))
        if folder == "loras":
            return web.json_response(sorted(self.env.loras))
        if folder in {"embeddings", "vae"}:
            return web.json_response([])
        return web.Response(status=404)

    async def get_embeddings(self, _request: web.Request) -> web.Response:
        return web.json_response([])
