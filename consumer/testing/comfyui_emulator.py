"""A protocol-faithful ComfyUI 0.8.0 emulator: HTTP + WebSocket on a real aiohttp server.

Test without a GPU against what a real ComfyUI says and does (checked against recorded traces in
tests/emulator): the same routes (also under /api), bodies, status codes, message order and
routing, queue and history semantics, upload renaming, caching of unchanged nodes, and nodes
that really run (Pillow image nodes; emulated SD nodes with one progress step per
`Faults.step_seconds`). `Faults` injects failures at run time.

    async with ComfyEmulator(Faults(step_seconds=0.01)) as comfy:
        ...  # talk to comfy.url

Run one by hand: `python -m consumer.testing.comfyui_emulator --port 8188 [--step-seconds S]`.
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
from consumer.testing.emulator_nodes import Dirs, NodeEnv, NodeRegistry
from consumer.testing.emulator_queue import PromptQueue
from consumer.testing.emulator_routes import FEATURES, Routes
from consumer.testing.emulator_ws import SocketHub

__all__ = ["DEFAULT_CHECKPOINTS", "ComfyEmulator", "Faults", "main"]

DEFAULT_CHECKPOINTS = (
    "v1-5-pruned-emaonly.safetensors",
    "random-sd15.safetensors",
    "random-sd15-b.safetensors",
)


def default_registry() -> NodeRegistry:
    return NodeRegistry([*IO_NODES, *IMAGE_NODES, *DIFFUSION_NODES])


class ComfyEmulator:
    """One emulated ComfyUI server; `faults` may be changed while it runs.

    `output_dir` is the server's base folder (it gets input/, output/, temp/ like a ComfyUI
    checkout); a temporary one, removed on stop, when None.
    """

    def __init__(
        self,
        faults: Faults | None = None,
        output_dir: Path | None = None,
        checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
    ) -> None:
        self.faults = faults or Faults()
        self._own_dir = output_dir is None
        root = (
            Path(tempfile.mkdtemp(prefix="comfy-emulator-")) if output_dir is None else output_dir
        )
        self.env = NodeEnv(Dirs(root), tuple(checkpoints))
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
        executor = Executor(self.registry, self.env, self.faults, queue, hub)
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
        """Come back on the same port with an empty queue and history (files persist)."""
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
    faults = Faults(step_seconds=args.step_seconds, model_load_seconds=args.model_load_seconds)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--model-load-seconds", type=float, default=0.0)
    parser.add_argument("--base-dir", default=None, help="folder for input/, output/, temp/")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
