"""Graphs, manifests and catalog edits the workflow tests build on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.live_catalog import LiveCatalog
from consumer.settings import REPO_ROOT

WORKFLOWS_DIR = REPO_ROOT / "workflows"
REAL_TEMPLATE = WORKFLOWS_DIR / "templates" / "img2img_sd15.json"

MINIMAL_MANIFEST = """
[defaults]
template = "t.json"
negative_prompt = "ugly"
strength = 0.5
steps = 10
cfg = 6.5
sampler_name = "euler"
scheduler = "normal"
checkpoint = "v1-5-pruned-emaonly.safetensors"

[styles.clay]
prompt = "Clay Style, lovely, 3d, cute"
"""


def real_template() -> dict[str, Any]:
    """A fresh copy of the shipped img2img template."""
    template: dict[str, Any] = json.loads(REAL_TEMPLATE.read_text(encoding="utf-8"))
    return template


def node_by_title(graph: dict[str, Any], title: str) -> dict[str, Any]:
    """The node of `graph` whose `_meta.title` is `title`."""
    nodes: list[dict[str, Any]] = [
        n for n in graph.values() if n.get("_meta", {}).get("title") == title
    ]
    (node,) = nodes
    return node


def replace_file(path: Path, text: str) -> None:
    """Write as an operator should: a whole new file renamed over the old one."""
    staging = path.parent.parent / f".{path.name}.new"
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def edit_manifest(workflows: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there) by `new` in the styles.toml of `workflows`."""
    manifest = workflows / "styles.toml"
    text = manifest.read_text(encoding="utf-8")
    assert old in text
    replace_file(manifest, text.replace(old, new))


async def until_reloaded(live: LiveCatalog, check: Callable[[], bool], timeout_s: float) -> None:
    """Wait, reload attempt by reload attempt, until `check()` holds."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await live.attempted.wait()
