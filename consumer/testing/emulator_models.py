"""What loading a model file costs the emulator, modelled on ComfyUI 0.8.0 on one machine.

"Loaded" lives in the node output cache (emulator_graph.OutputCache), as in ComfyUI: a cached
CheckpointLoaderSimple does not run and costs nothing. When it runs, ComfyUI reads the file again
(comfy.sd.load_checkpoint_guess_config), and the cost depends on the OS page cache:

* cold: the first read of that file since the machine booted, `Faults.model_load_seconds`;
* recent: a re-read of a file read before, `Faults.model_reload_seconds`.

Measured on ComfyUI 0.8.0 (CPU, random-weight SD 1.5 checkpoints, 256x192 img2img, 1 step; five
prompts on one server): A 8.2 s cold, A 3.6 s cached, B 9.9 s cold, A 5.8 s, B 4.9 s. Taking
the cached run as the part every run pays, the loads cost A 4.6 s / B 6.3 s cold and A 2.2 s /
B 1.3 s recent: (2.2 + 1.3) / (4.6 + 6.3) = 0.32, hence `RELOAD_FRACTION`.

The page cache is a property of the machine: it survives `ComfyEmulator.restart()`, which models
a process restart (input/ and output/ persist; temp/, queue, history and caches do not). It is
unbounded: every checkpoint ever read stays "recent" (a real page cache evicts under memory
pressure). LoRA files are small: one read costs `Faults.lora_load_seconds`, and a LoraLoader
node instance keeps the LoRA it read last (ComfyUI's `self.loaded_lora`, in the per-node-id
objects cache), so re-running it with the same file costs no read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum

from consumer.testing.emulator_faults import Faults

RELOAD_FRACTION = 0.32
"""A re-read checkpoint costs this fraction of a cold load unless `model_reload_seconds` is set."""

LORA_FRACTION = 0.1
"""A LoRA read costs this fraction of a cold checkpoint load unless `lora_load_seconds` is set.
An estimate from file sizes (SD 1.5 LoRAs are 10-150 MB, checkpoints 2-4 GB), not a measurement."""

Sleep = Callable[[float], Awaitable[None]]


class LoadKind(StrEnum):
    """Which cost a model load was charged."""

    COLD = "cold"
    RECENT = "recent"
    LORA = "lora"


@dataclass(frozen=True)
class ModelLoad:
    """One model file load the emulator charged for (its log: `ComfyEmulator.model_loads`)."""

    prompt_id: str
    node_id: str
    name: str
    kind: LoadKind
    seconds: float


@dataclass
class PageCache:
    """The machine's side: model files read since boot, and every load charged (a log)."""

    files_read: set[str] = field(default_factory=set)
    loads: list[ModelLoad] = field(default_factory=list)


class ModelMemory:
    """The server process's side: charges model file reads; forgotten on restart."""

    def __init__(self, faults: Faults, page_cache: PageCache, sleep: Sleep = asyncio.sleep) -> None:
        self._faults = faults
        self._page_cache = page_cache
        self._sleep = sleep
        self._lora_instances: dict[tuple[str, str], str] = {}

    def __repr__(self) -> str:
        files = len(self._page_cache.files_read)
        return f"<ModelMemory files_read={files} loads={len(self._page_cache.loads)}>"

    def set_prompt(self, instances: Collection[tuple[str, str]]) -> None:
        """Keep only node instances (node id, class) of this prompt, as ComfyUI's objects cache."""
        kept = set(instances)
        self._lora_instances = {k: v for k, v in self._lora_instances.items() if k in kept}

    async def load_checkpoint(self, prompt_id: str, node_id: str, name: str) -> None:
        """A CheckpointLoaderSimple that runs: a cold or a page-cache read of the file."""
        path = f"checkpoints/{name}"
        if path in self._page_cache.files_read:
            await self._charge(ModelLoad(prompt_id, node_id, name, LoadKind.RECENT, self._reload_s))
        else:
            load_s = self._faults.model_load_seconds
            await self._charge(ModelLoad(prompt_id, node_id, name, LoadKind.COLD, load_s))
        self._page_cache.files_read.add(path)

    async def load_lora(self, prompt_id: str, instance: tuple[str, str], name: str) -> None:
        """A LoRA loader that runs: reads the file unless this node instance holds it already."""
        if self._lora_instances.get(instance) == name:
            return
        lora_s = self._faults.lora_load_seconds
        seconds = self._faults.model_load_seconds * LORA_FRACTION if lora_s is None else lora_s
        await self._charge(ModelLoad(prompt_id, instance[0], name, LoadKind.LORA, seconds))
        self._lora_instances[instance] = name

    @property
    def _reload_s(self) -> float:
        reload_s = self._faults.model_reload_seconds
        return self._faults.model_load_seconds * RELOAD_FRACTION if reload_s is None else reload_s

    async def _charge(self, load: ModelLoad) -> None:
        self._page_cache.loads.append(load)
        if load.seconds > 0:
            await self._sleep(load.seconds)
