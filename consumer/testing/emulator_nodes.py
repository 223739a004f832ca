"""Node registry of the ComfyUI emulator: node definitions and their /object_info rendering.

A `NodeDef` mirrors a ComfyUI node class: `input_types` is `INPUT_TYPES()` (computed per call,
since combos list files and checkpoints), `outputs` is `RETURN_TYPES`, `run` is `FUNCTION`,
`validate` is `VALIDATE_INPUTS` and `is_changed` is `IS_CHANGED`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumer.testing.emulator_faults import Faults
from consumer.testing.emulator_models import ModelMemory

InputTypes = dict[str, dict[str, Any]]
"""{"required": {name: [TYPE, {options}]}, "optional": {...}, "hidden": {...}}."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tiff", ".tif"})


class NodeExecutionError(Exception):
    """A node failed; `exception_type` is the name reported in `execution_error`."""

    def __init__(self, message: str, exception_type: str = "RuntimeError") -> None:
        super().__init__(message)
        self.exception_type = exception_type


class InterruptedError_(Exception):  # noqa: N801 - comfy's InterruptProcessingException
    """Raised at a node boundary or sampler step after /interrupt."""


@dataclass
class Dirs:
    """The input/output/temp folders of one emulated server."""

    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def temp(self) -> Path:
        return self.root / "temp"

    def by_type(self, kind: str) -> Path | None:
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind)

    def input_images(self) -> list[str]:
        """Top-level image files of input/, sorted, as LoadImage's combo lists them."""
        if not self.input.is_dir():
            return []
        files = (p for p in self.input.iterdir() if p.is_file())
        return sorted(p.name for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)

    def annotated(self, name: str) -> Path | None:
        """Resolve "sub/x.png" or "x.png [output]" like folder_paths.get_annotated_filepath."""
        base, kind = name, "input"
        for tag in ("output", "input", "temp"):
            if name.endswith(f" [{tag}]"):
                base, kind = name[: -len(tag) - 3], tag
        folder = self.by_type(kind)
        return None if folder is None else folder / base


@dataclass
class NodeEnv:
    """What INPUT_TYPES / VALIDATE_INPUTS / IS_CHANGED may look at."""

    dirs: Dirs
    checkpoints: tuple[str, ...]
    loras: tuple[str, ...] = ()


@dataclass
class NodeContext:
    """Everything a running node may use."""

    prompt_id: str
    node_id: str
    prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]
    env: NodeEnv
    faults: Faults
    models: ModelMemory
    """Charges model file loads (cold, page-cache or LoRA reads)."""
    progress: Callable[[int, int], Awaitable[None]]
    """Report a progress bar step (sends `progress_state` then `progress`)."""
    check_interrupt: Callable[[], None]
    """Raise `InterruptedError_` when /interrupt was called (sampler steps call it)."""


@dataclass
class NodeResult:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None = None


NodeFunction = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]


@dataclass(frozen=True)
class NodeDef:
    """One node class, as /object_info describes it and the executor runs it."""

    name: str
    display_name: str
    category: str
    input_types: Callable[[NodeEnv], InputTypes]
    outputs: tuple[str, ...]
    run: NodeFunction
    output_node: bool = False
    description: str = ""
    python_module: str = "nodes"
    output_names: tuple[str, ...] = ()
    output_tooltips: tuple[str, ...] = ()
    validate: Callable[[NodeEnv, dict[str, Any]], bool | str] | None = None
    validate_args: tuple[str, ...] = ()
    is_changed: Callable[[NodeEnv, dict[str, Any]], object] | None = None
    extra_info: Mapping[str, Any] = field(default_factory=dict)


def input_spec(node: NodeDef, env: NodeEnv, name: str) -> tuple[Any, str, dict[str, Any]] | None:
    """(type, category, options) of one input, like execution.get_input_info."""
    for category, specs in node.input_types(env).items():
        if name in specs:
            spec = specs[name]
            options = spec[1] if len(spec) > 1 else {}
            return spec[0], category, options
    return None


def object_info(node: NodeDef, env: NodeEnv) -> dict[str, Any]:
    """The /object_info entry of one node, keys in ComfyUI's order."""
    types = node.input_types(env)
    info: dict[str, Any] = {
        "input": types,
        "input_order": {category: list(specs) for category, specs in types.items()},
        "output": list(node.outputs),
        "output_is_list": [False] * len(node.outputs),
        "output_name": list(node.output_names or node.outputs),
        "name": node.name,
        "display_name": node.display_name,
        "description": node.description,
        "python_module": node.python_module,
        "category": node.category,
        "output_node": node.output_node,
    }
    if node.output_tooltips:
        info["output_tooltips"] = list(node.output_tooltips)
    info.update(node.extra_info)
    return info


class NodeRegistry:
    """The node classes one emulator knows (NODE_CLASS_MAPPINGS)."""

    def __init__(self, nodes: list[NodeDef]) -> None:
        self._nodes = {node.name: node for node in nodes}

    def get(self, name: object) -> NodeDef | None:
        return self._nodes.get(name) if isinstance(name, str) else None

    def names(self) -> list[str]:
        return list(self._nodes)
