"""Style versions: a content hash that moves with a style's own content and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from consumer.workflows import StyleCatalog
from tests.workflows.graphs import MINIMAL_MANIFEST, WORKFLOWS_DIR, node_by_title, real_template

# clay uses t.json, ink uses u.json (the same graph in another file)
MANIFEST = MINIMAL_MANIFEST + '\n[styles.ink]\nprompt = "Ink"\ntemplate = "u.json"\n'


@pytest.fixture
def load(tmp_path: Path):
    """Load a catalog from a fresh directory: the manifest and templates (dict or text)."""
    count = iter(range(1000))

    def build(manifest: str = MANIFEST, **templates: Any) -> dict[str, str]:
        directory = tmp_path / f"wf{next(count)}"
        (directory / "templates").mkdir(parents=True)
        (directory / "styles.toml").write_text(manifest, encoding="utf-8")
        files = {"t.json": real_template(), "u.json": real_template()}
        for name, body in (files | {f"{k}.json": v for k, v in templates.items()}).items():
            text = body if isinstance(body, str) else json.dumps(body)
            (directory / "templates" / name).write_text(text, encoding="utf-8")
        return StyleCatalog.load(directory).versions()

    return build


def test_shipped_versions_are_twelve_hex_digits_and_distinct() -> None:
    """Every shipped style has a 12-digit lowercase hex version; no two styles share one."""
    found = StyleCatalog.load(WORKFLOWS_DIR).versions()
    assert all(re.fullmatch(r"[0-9a-f]{12}", version) for version in found.values())
    assert len(set(found.values())) == len(found)


def test_same_content_gives_the_same_version(load) -> None:
    """Loading the same content twice, or reformatted, gives the same versions."""
    before = load()
    assert load() == before
    reordered = "# a comment\n" + MANIFEST.replace(
        'negative_prompt = "ugly"\nstrength = 0.5\n', 'strength = 0.5\nnegative_prompt = "ugly"\n'
    )
    pretty = json.dumps(dict(reversed(real_template().items())), indent=4, sort_keys=True)
    assert load(reordered, t=pretty) == before


def test_same_graph_in_another_file_gives_the_same_version(load) -> None:
    """The version is of content, not of file names: clay's graph renamed keeps its version."""
    before = load()
    renamed = MANIFEST.replace('template = "t.json"', 'template = "v.json"')
    assert load(renamed, v=real_template())["clay"] == before["clay"]


@pytest.mark.parametrize(
    "edit",
    [
        'prompt = "Clay Style, lovely, 3d, cute"\nsteps = 11\n',
        'prompt = "Clay Style, lovely, 3d"\n',
        'prompt = "Clay Style, lovely, 3d, cute"\nstrength = 0.55\n',
        'prompt = "Clay Style, lovely, 3d, cute"\n[styles.clay.overrides."sampler"]\ncfg = 8.0\n',
    ],
    ids=["steps", "prompt", "strength", "override"],
)
def test_editing_a_style_changes_only_its_version(load, edit: str) -> None:
    """A style's own prompt, default or override changes its version, not the other's."""
    before = load()
    after = load(MANIFEST.replace('prompt = "Clay Style, lovely, 3d, cute"\n', edit))
    assert after["clay"] != before["clay"]
    assert after["ink"] == before["ink"]


def test_editing_a_template_changes_the_styles_that_use_it(load) -> None:
    """A node added to t.json (an inverted output) changes clay's version only."""
    before = load()
    template = real_template()
    template["9"] = {"class_type": "ImageInvert", "inputs": {"image": ["7", 0]}}
    node_by_title(template, "output")["inputs"]["images"] = ["9", 0]
    after = load(t=template)
    assert after["clay"] != before["clay"]
    assert after["ink"] == before["ink"]


def test_editing_defaults_changes_every_style_that_inherits(load) -> None:
    """[defaults] feeds every style: an edit there changes the versions that take it."""
    before = load()
    after = load(MANIFEST.replace("cfg = 6.5", "cfg = 7.5"))
    assert after["clay"] != before["clay"]
    assert after["ink"] != before["ink"]
    pinned = MANIFEST + '[styles.ink.overrides."sampler"]\ncfg = 6.5\n'  # ink sets its own
    edited = pinned.replace("cfg = 6.5\nsampler_name", "cfg = 7.5\nsampler_name")
    assert edited != pinned
    assert load(edited)["ink"] == load(pinned)["ink"]
