"""A protocol-faithful ComfyUI 0.8.0 emulator: HTTP + WebSocket on a real aiohttp server.

Test without a GPU against what a real ComfyUI says and does (checked against recorded traces in
tests/emulator): the same routes (also under /api), bodies, status codes, message order and
routing, queue and history semantics, upload renaming, caching of unchanged nodes, and nodes
that really run (Pillow image nodes; emulated SD nodes with one progress step per
`Faults.step_seconds`). Model loads cost what they cost a real server (emulator_models: cold,
page-cache re-read, or nothing when the loader is cached). `Faults` injects failures at run time.

    async with ComfyEmulator(Faults(step_seconds=0.01)) as comfy:
        ...  # talk to comfy.url

Run one by hand: `python -m consumer.testing.comfyui_emulator --port 8188 [--step-seconds S]
[--model-load-seconds S]` (`--help` lists every flag).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web
from PIL import Image

from consumer.testing.emulator_diffusion_nodes import DIFFUSION_NODES
from consumer.testing.emulator_executor import Executor
from consumer.testing.emulator_faults import Faults
from consumer.testing.emulator_image_nodes import IMAGE_NODES
from consumer.testing.emulator_io_nodes import IO_NODES
from consumer.testing.emulator_lora_nodes import LORA_NODES
from consumer.testing.emulator_models import (
    LORA_FRACTION,
    RELOAD_FRACTION,
    ModelLoad,
    ModelMemory,
    PageCache,
    Sleep,
)
from consumer.testing.emulator_nodes import Dirs, NodeEnv, NodeRegistry
from consumer.testing.emulator_queue import PromptQueue
from consumer.testing.emulator_routes import FEATURES, Routes
from consumer.testing.emulator_ws import SocketHub

__all__ = ["DEFAULT_CHECKPOINTS", "DEFAULT_LORAS", "ComfyEmulator", "Faults", "ModelLoad", "main"]

DEFAULT_CHECKPOINTS = (
    "v1-5-pruned-emaonly.safetensors",
    "random-sd15.safetensors",
    "random-sd15-b.safetensors",
)
DEFAULT_LORAS = ("detail-tweaker-sd15.safetensors", "watercolor-sd15.safetensors")


def default_registry() -> NodeRegistry:
    return NodeRegistry([*IO_NODES, *IMAGE_NODES, *DIFFUSION_NODES, *LORA_NODES])


class ComfyEmulator:
    """One emulated ComfyUI server; `faults` may be changed while it runs.

    `output_dir` is the server's base folder (it gets input/, output/, temp/ like a ComfyUI
    checkout); a temporary one, removed on stop, when None. `sleep` waits out model loads
    (tests pass one that returns at once and read `model_loads`).
    """

    def __init__(
        self,
        faults: Faults | None = None,
        output_dir: Path | None = None,
        checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
        loras: Sequence[str] = DEFAULT_LORAS,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.faults = faults or Faults()
        self._page_cache = PageCache()
        self._sleep = sleep
        self._own_dir = output_dir is None
        root = (
            Path(tempfile.mkdtemp(prefix="comfy-emulator-")) if output_dir is None else output_dir
        )
        self.env = NodeEnv(Dirs(root), tuple(checkpoints), tuple(loras))
        self.registry = default_registry()
        self.url = ""
        self._port = 0
        self._host = "127.0.0.1"
        self._runner: web.AppRunner | None = None
        self._executor_task: asyncio.Task[None] | None = None
        self._routes: Routes | None = None
        self._executed_before = 0

    @property
    def prompts_executed(self) -> int:
        """Prompts that finished executing (success, error or interrupt), across restarts."""
        current = self._routes.executor.prompts_executed if self._routes else 0
        return self._executed_before + current

    @property
    def model_loads(self) -> list[ModelLoad]:
        """Every model load charged on this machine, oldest first, across restarts."""
        return list(self._page_cache.loads)

    @property
    def dirs(self) -> Dirs:
        return self.env.dirs

    def _prepare_dirs(self) -> None:
        for folder in (self.dirs.input, self.dirs.output):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dirs.temp, ignore_errors=True)  # ComfyUI wipes temp/ at startup
        self.dirs.temp.mkdir(parents=True)
        example = self.dirs.input / "example.png"
        if not example.exists():
            Image.new("RGB", (64, 64), (128, 128, 128)).save(example)

    def _build(self) -> Routes:
        holder: list[PromptQueue] = []
        hub = SocketHub(lambda: holder[0].queue_info(), FEATURES)  # noqa: PLW0108 - late-bound

        async def broadcast_status() -> None:
            await hub.send("status", {"status": holder[0].queue_info()})

        queue = PromptQueue(broadcast_status)
        holder.append(queue)
        models = ModelMemory(self.faults, self._page_cache, self._sleep)
        executor = Executor(self.registry, self.env, self.faults, queue, hub, models=models)
        return Routes(queue, hub, executor, self.registry, self.env, self.faults)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._prepare_dirs()
        self._routes = self._build()
        self._runner = web.AppRunner(self._routes.app(), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host, self._port = host, self._runner.addresses[0][1]
        self.url = f"http://{host}:{self._port}"
        self._executor_task = asyncio.create_task(self._routes.executor.run_forever())

    async def die(self) -> None:
        """Crash: close every connection, stop listening, forget queue, history and cache."""
        if self._routes is not None:
            self._executed_before += self._routes.executor.prompts_executed
            await self._routes.hub.close_all()
        if self._executor_task is not None:
            self._executor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._executor_task
            self._executor_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._routes = None

    async def restart(self) -> None:
        """A process restart on the same machine and port: queue, history, node cache and
        loaded models are gone; files persist, and so does the OS page cache (checkpoints read
        before the restart reload at `model_reload_seconds`, not `model_load_seconds`)."""
        await self.die()
        await self.start(self._host, self._port)

    async def stop(self) -> None:
        await self.die()
        if self._own_dir:
            shutil.rmtree(self.dirs.root, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _serve(args: argparse.Namespace) -> None:
    faults = Faults(
        step_seconds=args.step_seconds,
        model_load_seconds=args.model_load_seconds,
        model_reload_seconds=args.model_reload_seconds,
        lora_load_seconds=args.lora_load_seconds,
    )
    root = Path(args.base_dir) if args.base_dir else None
    emulator = ComfyEmulator(faults, root)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await emulator.start(args.host, args.port)
    print(f"ComfyUI emulator listening on {emulator.url}", flush=True)  # noqa: T201
    try:
        await stopping.wait()
    finally:
        await emulator.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8188)
    add("--step-seconds", type=float, default=0.0, help="wall time of each KSampler step")
    add(
        "--model-load-seconds",
        type=float,
        default=0.0,
        help="cold checkpoint load: the first read of that file since this emulator started",
    )
    add(
        "--model-reload-seconds",
        type=float,
        default=None,
        help="checkpoint load of a file read before (OS page cache; survives a restart);"
        f" default {RELOAD_FRACTION} x --model-load-seconds (measured on ComfyUI 0.8.0)."
        " A cached CheckpointLoaderSimple (same checkpoint as the previous prompt) costs 0",
    )
    add(
        "--lora-load-seconds",
        type=float,
        default=None,
        help="LoRA file read by LoraLoader/LoraLoaderModelOnly;"
        f" default {LORA_FRACTION} x --model-load-seconds (an estimate from file sizes)",
    )
    add("--base-dir", default=None, help="folder for input/, output/, temp/")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(_serve(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
