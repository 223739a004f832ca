"""The emulator's executor: one prompt at a time, ComfyUI's message sequence and routing.

Per prompt (execution.PromptExecutor.execute_async + main.prompt_worker): `execution_start`,
`execution_cached`, then per node `progress_state` (running), `executing`, [`progress_state` +
`progress` per sampler step], [`executed`], `progress_state` (finished); then
`execution_success` | `execution_error` | `execution_interrupted`; history is written (after
`Faults.history_delay_s`), `status` is broadcast, and `executing {node: null}` ends it.
Targeted events go to the prompt's client only (none without a client_id); progress events go
to that client or, without one, to everybody.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from consumer.testing.emulator_faults import Faults
from consumer.testing.emulator_graph import (
    CacheEntry,
    ExecutionList,
    OutputCache,
    Signatures,
    is_link,
)
from consumer.testing.emulator_models import ModelMemory
from consumer.testing.emulator_nodes import (
    InterruptedError_,
    NodeContext,
    NodeDef,
    NodeEnv,
    NodeExecutionError,
    NodeRegistry,
    NodeResult,
)
from consumer.testing.emulator_queue import PromptQueue, QueueItem
from consumer.testing.emulator_validation import full_type_name
from consumer.testing.emulator_ws import SocketHub

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


def format_value(value: Any) -> Any:
    """execution.format_value: plain JSON stays, everything else becomes its str()."""
    if value is None or isinstance(value, int | float | bool | str | dict):
        return value
    if isinstance(value, list) and value and hasattr(value[0], "size"):
        width, height = value[0].size
        return f"tensor(<image batch of shape [{len(value)}, {height}, {width}, 3]>)"
    return str(value)


class _NodeFailedError(Exception):
    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload["exception_message"])
        self.payload = payload


@dataclass
class _Run:
    """State of the prompt being executed."""

    item: QueueItem
    messages: list[list[Any]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    sampler_steps: int = 0

    @property
    def prompt_id(self) -> str:
        return self.item.prompt_id

    def node(self, node_id: str) -> dict[str, Any]:
        node: dict[str, Any] = self.item.prompt[node_id]
        return node


class Executor:
    """Takes prompts off the queue forever; `interrupt()` lands at the next node or step."""

    def __init__(
        self,
        registry: NodeRegistry,
        env: NodeEnv,
        faults: Faults,
        queue: PromptQueue,
        hub: SocketHub,
        *,
        models: ModelMemory,
    ) -> None:
        self._registry = registry
        self._env = env
        self._faults = faults
        self._queue = queue
        self._hub = hub
        self._cache = OutputCache()
        self._models = models
        self._interrupted = False
        self._free_memory = False
        self.prompts_executed = 0

    def free_memory(self) -> None:
        """POST /free with free_memory: ComfyUI's worker resets its caches (`e.reset()`)
        when idle or after the running prompt, so the next prompt starts with none cached.
        `unload_models` alone only moves models out of VRAM, which this CPU emulator has not."""
        self._free_memory = True

    def interrupt(self) -> None:
        self._interrupted = True

    def check_interrupt(self) -> None:
        if self._interrupted:
            self._interrupted = False
            raise InterruptedError_

    async def run_forever(self) -> None:
        while True:
            task_id, item = await self._queue.get()
            try:
                await self._execute(task_id, item)
            except Exception:
                log.exception("emulator bug while executing %s", item.prompt_id)
                status = {"status_str": "error", "completed": False, "messages": []}
                await self._queue.task_done(task_id, {"outputs": {}, "meta": {}}, status)

    async def _send(self, event: str, data: dict[str, Any]) -> None:
        """Targeted event: only to the prompt's client, nothing without one."""
        if self._hub.client_id is not None:
            await self._hub.send(event, data, self._hub.client_id)

    async def _send_progress(self, event: str, data: dict[str, Any]) -> None:
        """To the prompt's client, or broadcast when the prompt has none."""
        await self._hub.send(event, data, self._hub.client_id)

    async def _add_message(
        self, run: _Run, event: str, data: dict[str, Any], broadcast: bool
    ) -> None:
        data = {**data, "timestamp": _now_ms()}
        run.messages.append([event, data])
        if self._hub.client_id is not None or broadcast:
            await self._hub.send(event, data, self._hub.client_id)

    async def _progress_state(
        self, run: _Run, node_id: str, state: str, value: float, top: float
    ) -> None:
        run.progress[node_id] = {"value": value, "max": top, "state": state}
        nodes: dict[str, Any] = {
            nid: {
                **entry,
                "node_id": nid,
                "prompt_id": run.prompt_id,
                "display_node_id": nid,
                "parent_node_id": None,
                "real_node_id": nid,
            }
            for nid, entry in run.progress.items()
        }
        await self._send_progress("progress_state", {"prompt_id": run.prompt_id, "nodes": nodes})

    async def _finish_progress(self, run: _Run, node_id: str) -> None:
        """ProgressRegistry.finish_progress: value = max (ints 1/1 for a node never started)."""
        top = run.progress[node_id]["max"] if node_id in run.progress else 1
        await self._progress_state(run, node_id, "finished", top, top)

    async def _execute(self, task_id: int, item: QueueItem) -> None:
        run = _Run(item)
        self._interrupted = False
        self._hub.client_id = item.client_id
        await self._add_message(
            run, "execution_start", {"prompt_id": run.prompt_id}, broadcast=False
        )
        cached_data = {"nodes": self._set_prompt(item.prompt), "prompt_id": run.prompt_id}
        await self._add_message(run, "execution_cached", cached_data, broadcast=False)
        success = await self._run_nodes(run)
        if success:
            data = {"prompt_id": run.prompt_id}
            await self._add_message(run, "execution_success", data, broadcast=False)
        self._hub.last_node_id = None
        await self._finish(task_id, run, success)

    def _set_prompt(self, prompt: dict[str, Any]) -> list[str]:
        """Apply a pending /free, keep what this prompt can use; the ids served from cache."""
        if self._free_memory:
            self._free_memory = False
            self._cache.clear()
            self._models.set_prompt(())
        self._cache.set_prompt(Signatures(prompt, self._registry, self._env).all())
        self._models.set_prompt([(n, node["class_type"]) for n, node in prompt.items()])
        return [n for n in prompt if self._cache.get(n) is not None]

    async def _finish(self, task_id: int, run: _Run, success: bool) -> None:
        if self._faults.history_delay_s > 0:
            await asyncio.sleep(self._faults.history_delay_s)
        result = {
            "outputs": {n: ui["output"] for n, ui in run.ui.items()},
            "meta": {n: ui["meta"] for n, ui in run.ui.items()},
        }
        status_str = "success" if success else "error"
        status = {"status_str": status_str, "completed": success, "messages": run.messages}
        self.prompts_executed += 1
        await self._queue.task_done(task_id, result, status)
        await self._send("executing", {"node": None, "prompt_id": run.prompt_id})

    def _is_output(self, run: _Run, node_id: str) -> bool:
        node_def = self._registry.get(run.node(node_id)["class_type"])
        return node_def is not None and node_def.output_node

    async def _run_nodes(self, run: _Run) -> bool:
        order = ExecutionList(
            run.item.prompt,
            lambda n: self._is_output(run, n),
            lambda n: self._cache.get(n) is not None,
        )
        for output_id in run.item.outputs:
            order.add_node(output_id)
        while not order.is_empty():
            node_id = order.next_node()
            if node_id is None:
                return False
            if not await self._run_node(run, node_id):
                return False
            order.complete(node_id)
        return True

    async def _run_node(self, run: _Run, node_id: str) -> bool:
        """Execute (or replay from cache) one node; False after an error or interrupt."""
        node = run.node(node_id)
        try:
            if self._cache.get(node_id) is not None:
                await self._replay_cached(run, node_id)
            else:
                await self._execute_node(run, node_id)
        except InterruptedError_:
            data: dict[str, Any] = {"prompt_id": run.prompt_id, "node_id": node_id}
            data |= {"node_type": node["class_type"], "executed": list(run.executed)}
            await self._add_message(run, "execution_interrupted", data, broadcast=True)
            return False
        except _NodeFailedError as failure:
            await self._add_message(run, "execution_error", failure.payload, broadcast=False)
            return False
        return True

    async def _replay_cached(self, run: _Run, node_id: str) -> None:
        entry = self._cache.get(node_id)
        assert entry is not None  # noqa: S101 - checked by the caller
        output = entry.ui
        data = {"node": node_id, "display_node": node_id, "output": output}
        await self._send("executed", {**data, "prompt_id": run.prompt_id})
        if output is not None:
            run.ui[node_id] = {"output": output, "meta": _meta(node_id)}
        await self._finish_progress(run, node_id)

    async def _execute_node(self, run: _Run, node_id: str) -> None:
        node = run.node(node_id)
        node_def = self._registry.get(node["class_type"])
        assert node_def is not None  # noqa: S101 - validated before queueing
        await self._progress_state(run, node_id, "running", 0.0, 1.0)
        if self._hub.client_id is not None:
            self._hub.last_node_id = node_id
            data = {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id}
            await self._send("executing", data)
        self.check_interrupt()
        args = self._input_data(run, node_def, node)
        result = await self._call(run, node_id, node_def, args)
        run.executed.append(node_id)
        self._cache.set(node_id, CacheEntry(result.outputs, result.ui))
        if result.ui is not None:
            run.ui[node_id] = {"output": result.ui, "meta": _meta(node_id)}
            executed = {"node": node_id, "display_node": node_id, "output": result.ui}
            await self._send("executed", {**executed, "prompt_id": run.prompt_id})
        await self._finish_progress(run, node_id)

    def _input_data(self, run: _Run, node_def: NodeDef, node: dict[str, Any]) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if is_link(value):
                source, index = value[0], int(value[1])
                cached = self._cache.get(source)
                outputs = cached.outputs if cached is not None else run.outputs.get(source, ())
                args[name] = outputs[index]
            else:
                args[name] = value
        hidden = node_def.input_types(self._env).get("hidden", {})
        if "prompt" in hidden:
            args["prompt"] = run.item.prompt
        if "extra_pnginfo" in hidden:
            args["extra_pnginfo"] = run.item.extra_data.get("extra_pnginfo")
        return args

    async def _call(
        self, run: _Run, node_id: str, node_def: NodeDef, args: dict[str, Any]
    ) -> NodeResult:
        started = asyncio.get_running_loop().time()
        try:
            result = await self._invoke(run, node_id, node_def, args)
        except InterruptedError_:
            raise
        except Exception as ex:
            raise _NodeFailedError(self._error_payload(run, node_id, node_def, args, ex)) from ex
        elapsed_s = asyncio.get_running_loop().time() - started
        if self._faults.node_seconds > elapsed_s:
            await asyncio.sleep(self._faults.node_seconds - elapsed_s)
        run.outputs[node_id] = result.outputs
        return result

    async def _invoke(
        self, run: _Run, node_id: str, node_def: NodeDef, args: dict[str, Any]
    ) -> NodeResult:
        if self._faults.hang:
            await asyncio.Event().wait()
        if self._faults.execution_error_at in (node_id, node_def.name):
            message = f"Emulated failure injected at node {node_id} ({node_def.name})"
            raise NodeExecutionError(message)
        ctx = NodeContext(
            prompt_id=run.prompt_id,
            node_id=node_id,
            prompt=run.item.prompt,
            extra_data=run.item.extra_data,
            env=self._env,
            faults=self._faults,
            models=self._models,
            progress=self._step_reporter(run, node_id),
            check_interrupt=self.check_interrupt,
        )
        return await node_def.run(ctx, args)

    def _step_reporter(self, run: _Run, node_id: str) -> Callable[[int, int], Any]:
        async def report(value: int, top: int) -> None:
            await self._progress_state(run, node_id, "running", value, top)
            data = {"value": value, "max": top, "prompt_id": run.prompt_id, "node": node_id}
            await self._send_progress("progress", data)
            run.sampler_steps += 1
            drop_after = self._faults.drop_ws_after_steps
            if drop_after is not None and run.sampler_steps >= drop_after:
                self._faults.drop_ws_after_steps = None
                await self._hub.close_all()

        return report

    def _error_payload(
        self, run: _Run, node_id: str, node_def: NodeDef, args: dict[str, Any], ex: Exception
    ) -> dict[str, Any]:
        kind = ex.exception_type if isinstance(ex, NodeExecutionError) else full_type_name(ex)
        inputs = {name: [format_value(value)] for name, value in args.items()}
        payload: dict[str, Any] = {
            "prompt_id": run.prompt_id,
            "node_id": node_id,
            "node_type": node_def.name,
            "executed": list(run.executed),
            "exception_message": f"{ex}\n",
            "exception_type": kind,
            "traceback": traceback.format_tb(ex.__traceback__),
            "current_inputs": inputs,
            "current_outputs": list(run.item.prompt),
        }
        return payload


def _meta(node_id: str) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "display_node": node_id,
        "parent_node": None,
        "real_node_id": node_id,
    }
