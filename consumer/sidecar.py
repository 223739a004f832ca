"""The sidecar HTTP port: health, readiness, stats, task lookup, metrics and stored outputs.

There is no request ingress here: requests arrive through the broker. Task endpoints and
stats need `Authorization: Bearer <SIDECAR_TOKEN>` when a token is set (settings refuse a
non-loopback SIDECAR_HOST without one); health, readiness and metrics never do, and outputs
are public behind unguessable paths.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

import orjson
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.state import task_key
from contracts.ids import USER_ID_PATTERN, is_valid_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from prometheus_client import CollectorRegistry

    from consumer.state import TaskRecord, TaskStateStore
    from consumer.storage import LocalOutputStore

MAX_LIST_LIMIT = 500


class ServiceView(Protocol):
    """What the sidecar asks of the running service."""

    async def readiness(self) -> dict[str, str | None]:
        """Each dependency's failure reason, or None when it is fine."""
        ...

    def health(self) -> dict[str, Any]: ...
    async def stats(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SidecarDeps:
    view: ServiceView
    store: TaskStateStore
    registry: CollectorRegistry
    outputs: LocalOutputStore | None = None
    token: str | None = None


DEPS = web.AppKey("deps", SidecarDeps)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=str), status=status, content_type="application/json"
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _authorized(request: web.Request) -> bool:
    token = request.app[DEPS].token
    if not token:
        return True
    scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        _header_bytes(credentials), _header_bytes(token)
    )


def _header_bytes(text: str) -> bytes:
    """`text` as bytes, whatever it holds: aiohttp decodes header bytes that are not UTF-8
    to lone surrogates, which a plain encode() refuses (that was a 500)."""
    return text.encode("utf-8", "surrogatepass")


def _protected(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not _authorized(request):
            return _error(401, "unauthorized", "a valid bearer token is required")
        return await handler(request)

    return guarded


async def healthz(_: web.Request) -> web.Response:
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[DEPS].view.readiness()
    failing = {name: reason for name, reason in checks.items() if reason is not None}
    body = {"ok": sorted(n for n, r in checks.items() if r is None), "failing": failing}
    return _json(body, 503 if failing else 200)


async def health(request: web.Request) -> web.Response:
    return _json(request.app[DEPS].view.health())


async def stats(request: web.Request) -> web.Response:
    return _json(await request.app[DEPS].view.stats())


async def task(request: web.Request) -> web.Response:
    """A task by id; `?user_id=` names its owner, needed only when several users used the id."""
    task_id, user_id = request.match_info["task_id"], request.query.get("user_id")
    if user_id is not None and not is_valid_id(user_id, USER_ID_PATTERN):
        return _error(400, "invalid_request", "user_id must match " + USER_ID_PATTERN)
    found = await _tasks_named(request.app[DEPS].store, task_id, user_id)
    if not found:
        return _error(404, "not_found", f"no task {task_id!r}")
    if len(found) > 1:
        message = f"several users have a task {task_id!r}: add ?user_id=<owner>"
        return _error(409, "ambiguous", message)
    return _json(found[0].model_dump(mode="json", exclude={"terminal_event"}))


async def _tasks_named(
    store: TaskStateStore, task_id: str, user_id: str | None
) -> list[TaskRecord]:
    """Task ids are scoped by user: the owner's task, or (at most two of) everyone's."""
    if not is_valid_id(task_id):
        return []
    if user_id is None:
        return await store.find(task_id, limit=2)
    record = await store.get(task_key(user_id, task_id))
    return [] if record is None else [record]


async def user_tasks(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    if not is_valid_id(user_id, USER_ID_PATTERN):
        return _error(400, "invalid_request", "user_id must match " + USER_ID_PATTERN)
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return _error(400, "invalid_request", "limit must be an integer")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        return _error(400, "invalid_request", f"limit must be within 1..{MAX_LIST_LIMIT}")
    records = await request.app[DEPS].store.list_for_user(user_id, limit)
    tasks = [r.model_dump(mode="json", exclude={"terminal_event"}) for r in records]
    return _json({"user_id": user_id, "tasks": tasks, "count": len(tasks)})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[DEPS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def output(request: web.Request) -> web.StreamResponse:
    outputs = request.app[DEPS].outputs
    path = outputs.resolve(request.match_info["path"]) if outputs else None
    if path is None:
        return _error(404, "not_found", "no such output")
    return web.FileResponse(path)


def build_app(deps: SidecarDeps) -> web.Application:
    app = web.Application()
    app[DEPS] = deps
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/stats", _protected(stats))
    app.router.add_get("/api/v1/task/{task_id}", _protected(task))
    app.router.add_get("/api/v1/user/{user_id}/tasks", _protected(user_tasks))
    if deps.outputs is not None:  # the local store; an object store serves its own URLs
        app.router.add_get("/outputs/{path:.+}", output)
    return app


class Sidecar:
    """Runs the sidecar app on host:port for the life of an `async with`."""

    def __init__(self, deps: SidecarDeps, host: str, port: int) -> None:
        self._runner = web.AppRunner(build_app(deps), access_log=None)
        self._host = host
        self._port = port
        self.port = port

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
