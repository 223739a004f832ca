"""`ComfyClient`: one ComfyUI instance, one aiohttp session, ONE WebSocket for all our prompts.

    async with ComfyClient("http://gpu-1:8188", timeouts=ClientTimeouts(...)) as client:
        image = await client.upload_image(png, f"{task_id}.png")
        run = await client.submit(prompt)          # PromptRun
        images = await run.wait(timeout_s=600)     # list[OutputImage]
        data = await client.view(images[0])

Events of every prompt we submitted arrive on the client's one socket (its own clientId)
and are routed to the `PromptRun` by prompt id (which we choose, so no event can arrive
before we know it). After each reconnect the client reconciles every outstanding prompt
through /queue and /history; if the socket stays down past `outage_grace_s`, outstanding
prompts fail as `InstanceUnavailable` (retriable).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import yarl

from consumer.comfy.http import ClientTimeouts, ComfyHttp, refuse_redirects
from consumer.comfy.messages import (
    Event,
    Executing,
    ExecutionFailed,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    HistoryEntry,
    OutputImage,
    QueueState,
    Status,
    describe_rejection,
    parse_history,
    parse_queue,
)
from consumer.comfy.run import PromptRun
from consumer.comfy.ws import ComfySocket, SocketHooks
from consumer.errors import ComfyRejected, InstanceUnavailable

log = logging.getLogger(__name__)

_BAD_REQUEST = 400
_TOO_LARGE = 413
_TERMINAL = (ExecutionSuccess, ExecutionFailed, ExecutionInterrupted)


class ComfyClient:
    """Talks to one ComfyUI instance. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeouts: ClientTimeouts | None = None,
        client_id: str | None = None,
    ) -> None:
        # Credentials in the URL go into an Authorization header, never into messages.
        url = yarl.URL(base_url.rstrip("/"))
        self._headers = {"Authorization": _basic_auth(url.user, url.password)} if url.user else {}
        self.base_url = str(url.with_user(None))
        self.client_id = client_id or uuid.uuid4().hex
        self.timeouts = timeouts or ClientTimeouts()
        self._runs: dict[str, PromptRun] = {}
        self._running: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._socket: ComfySocket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._api: ComfyHttp | None = None
        self._abandoned: str | None = None  # why it takes no more prompts (left the pool)

    def __repr__(self) -> str:
        state = "up" if self.connected else "down"
        return f"<ComfyClient {self.base_url} ws={state} outstanding={len(self._runs)}>"

    @property
    def history_wait_s(self) -> float:
        return self.timeouts.history_wait_s

    @property
    def connected(self) -> bool:
        return self._socket is not None and self._socket.connected

    @property
    def outstanding(self) -> int:
        """Prompts submitted and not yet awaited to the end."""
        return len(self._runs)

    # -- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=self.timeouts.client_timeout(),
            headers=self._headers,
            trace_configs=[refuse_redirects()],  # the WebSocket handshake too
        )
        self._api = ComfyHttp(self._session, self.base_url)
        hooks = SocketHooks(self._on_event, self._reconcile, self._on_down)
        ws_url = f"{self.base_url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}"
        self._socket = ComfySocket(
            self._session,
            ws_url,
            hooks,
            reconnect_max_s=self.timeouts.ws_reconnect_max_s,
            heartbeat_s=self.timeouts.ws_heartbeat_s,
        )
        self._reader = asyncio.create_task(self._socket.run(), name=f"comfy-ws {self.base_url}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])  # our own cancellation still propagates
            if not self._reader.cancelled() and self._reader.exception() is not None:
                log.error(
                    "websocket reader of %s failed",
                    self.base_url,
                    exc_info=self._reader.exception(),
                )
        self._fail_all(f"client of {self.base_url} closed")
        if self._session is not None:
            await self._session.close()

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        """True once the socket is open, False after `timeout_s` (default: connect timeout)."""
        return await self._sock.wait_connected(timeout_s or self.timeouts.connect_s)

    # -- prompts ----------------------------------------------------------------------

    async def upload_image(
        self, data: bytes, filename: str, subfolder: str = "style-consumer"
    ) -> str:
        """Upload into `input/<subfolder>/`; returns the LoadImage `image` value."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        answer = await self._http.request("POST", "/upload/image", data=form)
        body = answer.json()
        if not answer.ok or not isinstance(body, Mapping) or "name" not in body:
            raise InstanceUnavailable(
                f"upload of {filename!r} to {self.base_url} answered {answer.status}"
            )
        folder = str(body.get("subfolder") or "")
        return f"{folder}/{body['name']}" if folder else str(body["name"])

    async def submit(self, prompt: Mapping[str, Any], *, front: bool = False) -> PromptRun:
        """Queue an API-format prompt (`front`: ahead of the prompts already queued there);
        raises ComfyRejected (400) or InstanceUnavailable."""
        if self._abandoned is not None:
            raise InstanceUnavailable(self._abandoned)
        if not await self.wait_connected():
            raise InstanceUnavailable(f"no websocket to {self.base_url}: not submitting")
        run = PromptRun(str(uuid.uuid4()), frozenset(prompt), self)
        self._runs[run.prompt_id] = run
        try:
            await self._post_prompt(run, prompt, front)
        except InstanceUnavailable as exc:
            self.forget(run.prompt_id)
            if isinstance(exc.__cause__, TimeoutError):
                await self._withdraw(run.prompt_id)
            raise
        except BaseException:
            self.forget(run.prompt_id)
            raise
        run.accepted = True
        if (reason := self.abandoned) is not None:  # given up while we were posting it
            run.fail(InstanceUnavailable(reason))
            await self._withdraw(run.prompt_id)
        return run

    @property
    def abandoned(self) -> str | None:
        """Why this client takes no more prompts (`abandon`), or None."""
        return self._abandoned

    def abandon(self, reason: str) -> list[str]:
        """Give our prompts up: every outstanding one, and any submitted from now on, fails
        as `InstanceUnavailable(reason)` (retriable elsewhere). Returns their prompt ids,
        which are still queued or running there (see `stop_prompts`)."""
        self._abandoned = reason
        prompt_ids = [run.prompt_id for run in self._runs.values() if run.accepted]
        self._fail_all(reason)
        return prompt_ids

    async def stop_prompts(self, prompt_ids: list[str]) -> None:
        """Delete the prompts from the queue and interrupt them, best effort."""
        for prompt_id in prompt_ids:
            await self._withdraw(prompt_id)

    async def _withdraw(self, prompt_id: str) -> None:
        """Remove a prompt we chose the id of (also when a timed-out POST may have queued it)."""
        try:
            await self._http.post_json("/queue", {"delete": [prompt_id]})
            await self._http.post_json("/interrupt", {"prompt_id": prompt_id})
        except InstanceUnavailable as exc:
            log.warning("could not withdraw prompt %s from %s: %s", prompt_id, self.base_url, exc)

    async def _post_prompt(self, run: PromptRun, prompt: Mapping[str, Any], front: bool) -> None:
        body: dict[str, object] = {
            "prompt": prompt,
            "client_id": self.client_id,
            "prompt_id": run.prompt_id,
        }
        if front:
            body["front"] = True
        answer = await self._http.post_json("/prompt", body)
        if answer.status in {_BAD_REQUEST, _TOO_LARGE}:
            reason = describe_rejection(answer.json(), prompt)
            raise ComfyRejected(f"{self.base_url} rejected the prompt: {reason}")
        reply = answer.json()
        if not answer.ok or not isinstance(reply, Mapping):
            raise InstanceUnavailable(f"POST {self.base_url}/prompt answered {answer.status}")
        if isinstance(reply.get("prompt_id"), str) and reply["prompt_id"] != run.prompt_id:
            self._rekey(run, reply["prompt_id"])  # a server that ignores our prompt_id
        if reply.get("node_errors"):
            log.warning(
                "prompt %s accepted with dropped outputs: %s", run.prompt_id, reply["node_errors"]
            )

    async def adopt(self, prompt_id: str, poll_s: float = 0.5) -> list[OutputImage] | None:
        """Outputs of a prompt submitted earlier (by a replica that died), or None if unknown.

        Its socket events went to the old client id, so /history and /queue are polled until
        it ends. Raises like `PromptRun.wait()` when it failed; None when it vanished.
        """
        while True:
            entry = await self.history(prompt_id)
            if entry is not None:
                run = PromptRun(prompt_id, frozenset(), self)
                run.settle_from_history(entry)
                return await run.wait()
            if prompt_id not in await self.queue():
                return None
            await asyncio.sleep(poll_s)  # its events go to another client id: poll

    async def view(self, image: OutputImage) -> bytes:
        """The bytes of one output file."""
        params = {"filename": image.filename, "subfolder": image.subfolder, "type": image.type}
        answer = await self._http.request("GET", "/view", params=params)
        if not answer.ok:
            raise InstanceUnavailable(f"GET {self.base_url}/view {params} answered {answer.status}")
        return answer.body

    async def history(self, prompt_id: str) -> HistoryEntry | None:
        """The finished prompt's entry, or None while /history says `{}`."""
        return parse_history(prompt_id, await self._http.get_json(f"/history/{prompt_id}"))

    async def cancel_prompt(self, prompt_id: str, started: bool) -> bool:
        """Stop our prompt; True if it was running (an interrupt event will follow)."""
        if not started:
            state = await self._delete_queued(prompt_id)
            if prompt_id not in state.running:
                return prompt_id in state.pending
        await self._http.post_json("/interrupt", {"prompt_id": prompt_id})
        return True

    async def withdraw_prompt(self, prompt_id: str) -> bool:
        """Delete our prompt from the queue unless it started; True when it is neither
        pending nor running afterwards (deleted, or already finished)."""
        state = await self._delete_queued(prompt_id)
        return prompt_id not in state.running and prompt_id not in state.pending

    async def _delete_queued(self, prompt_id: str) -> QueueState:
        """Delete the prompt from the queue if it waits there; the queue afterwards."""
        await self._http.post_json("/queue", {"delete": [prompt_id]})
        return await self.queue()

    def _rekey(self, run: PromptRun, prompt_id: str) -> None:
        self.forget(run.prompt_id)
        run.prompt_id = prompt_id
        self._runs[prompt_id] = run

    def forget(self, prompt_id: str) -> None:
        self._runs.pop(prompt_id, None)

    # -- introspection ----------------------------------------------------------------

    async def system_stats(self) -> dict[str, Any]:
        body = await self._http.get_json("/system_stats")
        if not isinstance(body, dict):
            raise InstanceUnavailable(f"GET {self.base_url}/system_stats: not a JSON object")
        return body

    async def queue(self) -> QueueState:
        return parse_queue(await self._http.get_json("/queue"))

    async def object_info(self) -> dict[str, Any]:
        body = await self._http.get_json("/object_info")
        return body if isinstance(body, dict) else {}

    async def node_classes(self) -> frozenset[str]:
        """Every node class the instance offers."""
        return frozenset(await self.object_info())

    # -- socket hooks -----------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Status):
            return
        prompt_id = getattr(event, "prompt_id", None) or self._running
        if isinstance(event, ExecutionStart) or (isinstance(event, Executing) and event.node):
            self._running = prompt_id
        elif isinstance(event, (*_TERMINAL, Executing)):
            self._running = None
        run = self._runs.get(prompt_id) if prompt_id else None
        if run is not None:
            run.feed(event)

    async def _reconcile(self) -> None:
        """After a (re)connect: settle each outstanding prompt the socket may have missed."""
        runs = [run for run in self._runs.values() if run.accepted and not run.done]
        if not runs:
            return
        log.info("reconciling %d outstanding prompts on %s", len(runs), self.base_url)
        try:
            state = await self.queue()
            for run in runs:
                await self._reconcile_one(run, state)
        except InstanceUnavailable as exc:
            log.warning("reconciling %d prompts on %s failed: %s", len(runs), self.base_url, exc)

    async def _reconcile_one(self, run: PromptRun, state: QueueState) -> None:
        if run.prompt_id in state.running:
            run.mark_started()
            self._running = run.prompt_id
        elif run.prompt_id not in state.pending:
            run.settle_from_history(await self.history(run.prompt_id))

    def _on_down(self, down_for_s: float) -> None:
        if down_for_s >= self.timeouts.outage_grace_s:
            self._fail_all(f"websocket to {self.base_url} down for {down_for_s:.1f}s")

    def _fail_all(self, reason: str) -> None:
        for run in list(self._runs.values()):
            if run.accepted:
                run.fail(InstanceUnavailable(f"prompt {run.prompt_id}: {reason}"))

    @property
    def _http(self) -> ComfyHttp:
        if self._api is None:
            raise RuntimeError("use ComfyClient as `async with ComfyClient(...) as client`")
        return self._api

    @property
    def _sock(self) -> ComfySocket:
        if self._socket is None:
            raise RuntimeError("use ComfyClient as `async with ComfyClient(...) as client`")
        return self._socket


def _basic_auth(user: str, password: str | None) -> str:
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return f"Basic {token}"
