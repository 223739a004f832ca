"""Styles and their ComfyUI workflow templates: loaded and validated once, rendered per task.

A workflows directory (WORKFLOWS_DIR) holds::

    styles.toml          the manifest: a [defaults] table and one [styles.<name>] table per style
    templates/*.json     ComfyUI API-format graphs

Templates are bound by node title (`_meta.title`), never by node id:

    input_image      LoadImage            image                      required, set per task
    output           SaveImage            filename_prefix            required, set per task
    positive_prompt  CLIPTextEncode       text                       optional
    negative_prompt  CLIPTextEncode       text                       optional
    sampler          KSampler             seed, denoise, steps, cfg, sampler_name, scheduler
    checkpoint       CheckpointLoader...  ckpt_name                  optional

A style may set any other node input with `[styles.<name>.overrides."<title>"]`; an override of
a bound input (say `sampler.steps`) is the same as setting the style's field (`steps`).
Everything is checked in `StyleCatalog.load`, so a broken manifest stops the service at start-up
with a message naming the file, the style and the node. `Style.render` is pure.

Each style has a `version`: the first 12 hex digits of the sha256 of its finished graph and its
defaults as canonical JSON (sorted keys). The same content always gives the same version,
whatever the file layout, comments or key order; any change to what the style renders gives
another. Reloading while running is `consumer.live_catalog`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumer.errors import UnsupportedStyle, WorkflowInvalid

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

MANIFEST_NAME = "styles.toml"
VERSION_HEX_DIGITS = 12  # 48 bits: collisions are negligible among one style's edits
TEMPLATES_DIR_NAME = "templates"
REQUIRED_TITLES = ("input_image", "output")
BOUND_INPUTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "input_image": ("image",),
        "output": ("filename_prefix",),
        "positive_prompt": ("text",),
        "negative_prompt": ("text",),
        "sampler": ("seed", "denoise", "steps", "cfg", "sampler_name", "scheduler"),
        "checkpoint": ("ckpt_name",),
    }
)
# (title, input) -> the Style field that holds its value
_FIELD_OF_INPUT: Mapping[tuple[str, str], str] = MappingProxyType(
    {
        ("positive_prompt", "text"): "prompt",
        ("negative_prompt", "text"): "negative_prompt",
        ("sampler", "denoise"): "strength",
        ("sampler", "steps"): "steps",
        ("sampler", "cfg"): "cfg",
        ("sampler", "sampler_name"): "sampler_name",
        ("sampler", "scheduler"): "scheduler",
        ("checkpoint", "ckpt_name"): "checkpoint",
    }
)
# Node classes that load a model into the instance's memory -> the input naming the file.
MODEL_LOADER_INPUTS: Mapping[str, str] = MappingProxyType(
    {
        "CheckpointLoaderSimple": "ckpt_name",
        "CheckpointLoader": "ckpt_name",
        "ImageOnlyCheckpointLoader": "ckpt_name",
        "UNETLoader": "unet_name",
        "LoraLoader": "lora_name",
        "LoraLoaderModelOnly": "lora_name",
        "ControlNetLoader": "control_net_name",
        "UpscaleModelLoader": "model_name",
    }
)
_PER_TASK_INPUTS = frozenset(
    {("input_image", "image"), ("output", "filename_prefix"), ("sampler", "seed")}
)

Graph = dict[str, dict[str, Any]]
Scalar = str | int | float | bool
Strength = Annotated[float, Field(gt=0, le=1)]
Steps = Annotated[int, Field(ge=1, le=1000)]
Cfg = Annotated[float, Field(gt=0, le=100)]
Text = Annotated[str, Field(max_length=10_000)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
StyleName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderParams:
    """Per-task values. `None` keeps the style's preset prompt, negative prompt or strength."""

    image: str
    seed: int
    filename_prefix: str
    prompt: str | None = None
    negative_prompt: str | None = None
    strength: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Style:
    """One style: its defaults and a validated graph with those defaults already applied."""

    name: str
    prompt: str
    negative_prompt: str
    strength: float
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    checkpoint: str
    template_name: str
    version: str  # content hash of graph + defaults (see the module docstring)
    required_node_classes: frozenset[str]
    loaders: Mapping[str, str] = field(default_factory=dict)  # loader node id -> model file
    graph: Mapping[str, Mapping[str, Any]] = field(repr=False)
    node_ids: Mapping[str, str] = field(repr=False)  # title -> node id

    @property
    def models(self) -> frozenset[str]:
        """The model files (checkpoint, LoRAs, ...) an instance holds in memory to run it."""
        return frozenset(self.loaders.values())

    def render(self, params: RenderParams) -> Graph:
        """A new API-format prompt for one task; the style's graph is left untouched."""
        graph = cast("Graph", copy.deepcopy(dict(self.graph)))
        self._set(graph, "input_image", "image", params.image)
        self._set(graph, "output", "filename_prefix", params.filename_prefix)
        self._set(graph, "sampler", "seed", params.seed)
        if params.prompt is not None:
            self._set(graph, "positive_prompt", "text", params.prompt)
        if params.negative_prompt is not None:
            self._set(graph, "negative_prompt", "text", params.negative_prompt)
        if params.strength is not None:
            self._set(graph, "sampler", "denoise", params.strength)
        return graph

    def _set(self, graph: Graph, title: str, input_name: str, value: Scalar) -> None:
        node_id = self.node_ids.get(title)
        if node_id is not None:  # optional titles the template lacks are skipped
            graph[node_id]["inputs"][input_name] = value


class StyleLookup(Protocol):
    """What intake and the dispatcher ask of a catalog (a StyleCatalog, or a live one)."""

    def get(self, style_type: str) -> Style:
        """The style, or UnsupportedStyle."""
        ...


class StyleCatalog:
    """The styles of one workflows directory, by name."""

    def __init__(self, styles: Iterable[Style]) -> None:
        self._styles = {style.name: style for style in styles}

    @classmethod
    def load(cls, directory: Path) -> StyleCatalog:
        """Read and validate `styles.toml` and the templates it names; raise WorkflowInvalid."""
        return cls(_load_styles(directory))

    def get(self, style_type: str) -> Style:
        try:
            return self._styles[style_type]
        except KeyError:
            known = ", ".join(self._styles)
            raise UnsupportedStyle(f"unknown style {style_type!r}; known: {known}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._styles)

    def versions(self) -> dict[str, str]:
        """Each style's version, by name."""
        return {name: style.version for name, style in self._styles.items()}

    def required_node_classes(self) -> frozenset[str]:
        """Every node class any style needs (what a ComfyUI instance must offer to serve all)."""
        return frozenset().union(*(s.required_node_classes for s in self._styles.values()))

    def __contains__(self, style_type: object) -> bool:
        return style_type in self._styles

    def __len__(self) -> int:
        return len(self._styles)

    def __repr__(self) -> str:
        return f"<StyleCatalog styles={','.join(self._styles)}>"


# --- the manifest --------------------------------------------------------------------------


class _StyleEntry(BaseModel):
    """A [defaults] or [styles.<name>] table: every key optional, merged over [defaults]."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    template: Name | None = None
    prompt: Text | None = None
    negative_prompt: Text | None = None
    strength: Strength | None = None
    steps: Steps | None = None
    cfg: Cfg | None = None
    sampler_name: Name | None = None
    scheduler: Name | None = None
    checkpoint: Name | None = None
    overrides: dict[str, dict[str, Scalar]] = Field(default_factory=dict)


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    defaults: _StyleEntry = Field(default_factory=_StyleEntry)
    styles: dict[StyleName, _StyleEntry] = Field(min_length=1)


class _Resolved(BaseModel):
    """A style after merging: every field present and within its limits."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    template: Name
    prompt: Text
    negative_prompt: Text
    strength: Strength
    steps: Steps
    cfg: Cfg
    sampler_name: Name
    scheduler: Name
    checkpoint: Name


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or '(top)'}: {item['msg']}"
        f" (got {item['input']!r})"
        for item in error.errors(include_url=False)
    )


def _read_manifest(path: Path) -> _Manifest:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowInvalid(f"{path}: no style manifest here") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise WorkflowInvalid(f"{path}: not a readable TOML file: {exc}") from exc
    try:
        return _Manifest.model_validate(raw)
    except ValidationError as exc:
        raise WorkflowInvalid(f"{path}: {_describe(exc)}") from exc


def _merge(defaults: _StyleEntry, entry: _StyleEntry) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a style over [defaults]: (fields, overrides by title)."""
    fields = defaults.model_dump(exclude_none=True, exclude={"overrides"})
    fields |= entry.model_dump(exclude_none=True, exclude={"overrides"})
    overrides = {title: dict(inputs) for title, inputs in defaults.overrides.items()}
    for title, inputs in entry.overrides.items():
        overrides.setdefault(title, {}).update(inputs)
    return fields, overrides


def _load_styles(directory: Path) -> list[Style]:
    manifest_path = directory / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    templates = _TemplateCache(directory / TEMPLATES_DIR_NAME)
    styles = []
    for name, entry in manifest.styles.items():
        where = f"{manifest_path}: style {name!r}"
        fields, overrides = _merge(manifest.defaults, entry)
        styles.append(_build_style(where, name, fields, overrides, templates))
    return styles


def _build_style(
    where: str,
    name: str,
    fields: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    templates: _TemplateCache,
) -> Style:
    template = templates.get(where, fields.get("template"))
    graph = copy.deepcopy(template.graph)
    for title, inputs in overrides.items():
        for input_name, value in inputs.items():
            _check_override(where, template, title, input_name)
            if (title, input_name) in _FIELD_OF_INPUT:
                fields[_FIELD_OF_INPUT[title, input_name]] = value
            else:
                graph[template.node_ids[title]]["inputs"][input_name] = value
    try:
        resolved = _Resolved.model_validate(fields)
    except ValidationError as exc:
        raise WorkflowInvalid(f"{where}: {_describe(exc)}") from exc
    _apply_fields(graph, template.node_ids, resolved)
    defaults = resolved.model_dump(exclude={"template"})
    return Style(
        name=name,
        **defaults,
        template_name=resolved.template,
        version=style_version(graph, defaults),
        required_node_classes=frozenset(node["class_type"] for node in graph.values()),
        loaders=MappingProxyType(_loaders(graph)),
        graph=MappingProxyType(graph),
        node_ids=MappingProxyType(dict(template.node_ids)),
    )


def style_version(graph: Graph, defaults: Mapping[str, Any]) -> str:
    """The content hash of a finished graph and its defaults: canonical JSON, sha256, 12 hex."""
    canonical = json.dumps(
        {"graph": graph, "defaults": defaults},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:VERSION_HEX_DIGITS]


def _loaders(graph: Graph) -> dict[str, str]:
    """Each model-loading node of a finished graph and the model file it loads.

    Read once when the catalog loads, so that the scheduler knows a style's models (the
    checkpoint of styles.toml, LoRAs set through overrides) without parsing graphs per task.
    """
    found = {}
    for node_id, node in graph.items():
        input_name = MODEL_LOADER_INPUTS.get(node["class_type"])
        value = node["inputs"].get(input_name) if input_name else None
        if isinstance(value, str):
            found[node_id] = value
    return found


def _check_override(where: str, template: _Template, title: str, input_name: str) -> None:
    node_id = template.node_ids.get(title)
    if node_id is None:
        raise WorkflowInvalid(
            f"{where}: override of node titled {title!r}, which {template.path} does not have"
            f" (titles: {', '.join(sorted(template.node_ids))})"
        )
    node = template.graph[node_id]
    label = f"node {title!r} (id {node_id!r}, {node['class_type']})"
    if input_name not in node["inputs"]:
        raise WorkflowInvalid(
            f"{where}: override of input {input_name!r} that {label} in {template.path}"
            f" does not have (inputs: {', '.join(sorted(node['inputs']))})"
        )
    if (title, input_name) in _PER_TASK_INPUTS:
        raise WorkflowInvalid(f"{where}: {label} input {input_name!r} is set per task")
    if _is_link(node["inputs"][input_name]):
        raise WorkflowInvalid(f"{where}: {label} input {input_name!r} is a link, not a value")


def _apply_fields(graph: Graph, node_ids: Mapping[str, str], resolved: _Resolved) -> None:
    for (title, input_name), field_name in _FIELD_OF_INPUT.items():
        node_id = node_ids.get(title)
        if node_id is not None:
            graph[node_id]["inputs"][input_name] = getattr(resolved, field_name)


# --- templates -----------------------------------------------------------------------------


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    title: str | None = None


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    class_type: Annotated[str, Field(min_length=1)]
    inputs: dict[str, Any]
    meta: _Meta | None = Field(default=None, alias="_meta")


class _Graph(BaseModel):
    model_config = ConfigDict(strict=True)

    nodes: dict[str, _Node] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class _Template:
    path: Path
    graph: Graph
    node_ids: dict[str, str]  # title -> node id


class _TemplateCache:
    """Templates by file name, each read and checked once however many styles use it."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._templates: dict[str, _Template] = {}

    def get(self, where: str, name: str | None) -> _Template:
        if name is None:
            raise WorkflowInvalid(f"{where}: no template (set `template` here or in [defaults])")
        if name not in self._templates:
            self._templates[name] = self._load(where, name)
        return self._templates[name]

    def _load(self, where: str, name: str) -> _Template:
        path = self._directory / name
        if Path(name).name != name or not path.is_file():
            available = ", ".join(sorted(p.name for p in self._directory.glob("*.json")))
            raise WorkflowInvalid(
                f"{where}: unknown template {name!r} (no file {path}; available: {available})"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WorkflowInvalid(f"{path}: not valid JSON: {exc}") from exc
        return _check_template(path, raw)


def _check_template(path: Path, raw: object) -> _Template:
    try:
        parsed = _Graph.model_validate({"nodes": raw})
    except ValidationError as exc:
        raise WorkflowInvalid(f"{path}: not an API-format ComfyUI graph: {_describe(exc)}") from exc
    node_ids = _titles(path, parsed.nodes)
    for title in REQUIRED_TITLES:
        if title not in node_ids:
            raise WorkflowInvalid(f"{path}: no node titled {title!r} (set its `_meta.title`)")
    graph = cast("Graph", copy.deepcopy(raw))
    _check_bound_inputs(path, graph, node_ids)
    _check_links(path, graph)
    return _Template(path=path, graph=graph, node_ids=node_ids)


def _titles(path: Path, nodes: Mapping[str, _Node]) -> dict[str, str]:
    node_ids: dict[str, str] = {}
    for node_id, node in nodes.items():
        title = node.meta.title if node.meta else None
        if title is None:
            continue
        if title in node_ids:
            raise WorkflowInvalid(
                f"{path}: title {title!r} is used by nodes {node_ids[title]!r} and {node_id!r}"
            )
        node_ids[title] = node_id
    return node_ids


def _check_bound_inputs(path: Path, graph: Graph, node_ids: Mapping[str, str]) -> None:
    for title, input_names in BOUND_INPUTS.items():
        node_id = node_ids.get(title)
        if node_id is None:
            continue
        node = graph[node_id]
        missing = [name for name in input_names if name not in node["inputs"]]
        if missing:
            raise WorkflowInvalid(
                f"{path}: node {title!r} (id {node_id!r}, {node['class_type']}) lacks"
                f" input(s) {', '.join(missing)} that the title {title!r} binds"
            )


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)  # noqa: PLR2004


def _check_links(path: Path, graph: Graph) -> None:
    for node_id, node in graph.items():
        for input_name, value in node["inputs"].items():
            if not _is_link(value):
                continue
            source, index = value
            if source not in graph:
                raise WorkflowInvalid(
                    f"{path}: node {node_id!r} ({node['class_type']}) input {input_name!r}"
                    f" links to node {source!r}, which does not exist"
                )
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise WorkflowInvalid(
                    f"{path}: node {node_id!r} input {input_name!r}: output index {index!r}"
                    " is not an int >= 0"
                )
