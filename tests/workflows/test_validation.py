"""Every way a workflows directory can be broken is refused at load, naming what is wrong."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from consumer.errors import WorkflowInvalid
from consumer.workflows import StyleCatalog
from tests.workflows.conftest import WriteDir
from tests.workflows.graphs import MINIMAL_MANIFEST, real_template


def load_error(directory: Path) -> str:
    """The message of the WorkflowInvalid that loading `directory` raises."""
    with pytest.raises(WorkflowInvalid) as caught:
        StyleCatalog.load(directory)
    return caught.value.message


def with_style_lines(*lines: str) -> str:
    """The minimal manifest with extra lines appended to [styles.clay]."""
    return MINIMAL_MANIFEST + "\n".join(lines) + "\n"


def test_missing_manifest(tmp_path: Path) -> None:
    """A directory without styles.toml is refused, naming the path."""
    assert re.search(r"styles\.toml: no style manifest", load_error(tmp_path))


def test_bad_toml(write_dir: WriteDir) -> None:
    """A manifest that is not TOML is refused, naming the file."""
    assert "styles.toml: not a readable TOML file" in load_error(write_dir("[styles.clay\n"))


def test_no_styles(write_dir: WriteDir) -> None:
    """A manifest with no styles is refused."""
    message = load_error(write_dir('[defaults]\ntemplate = "t.json"\n'))
    assert "styles.toml" in message
    assert "styles" in message


def test_unknown_template(write_dir: WriteDir) -> None:
    """A style naming a template that does not exist is refused, naming the style and file."""
    message = load_error(write_dir(with_style_lines('template = "nope.json"')))
    assert "style 'clay'" in message
    assert "unknown template 'nope.json'" in message
    assert "available: t.json" in message


def test_template_outside_templates_dir(write_dir: WriteDir) -> None:
    """A template name that is a path (../x.json) is refused as unknown."""
    message = load_error(write_dir(with_style_lines('template = "../styles.toml"')))
    assert "unknown template '../styles.toml'" in message


def test_bad_json(write_dir: WriteDir) -> None:
    """A template that is not JSON is refused, naming the template file."""
    message = load_error(write_dir(templates={"t.json": "{not json"}))
    assert re.search(r"templates/t\.json: not valid JSON", message)


def test_ui_format_is_refused(write_dir: WriteDir) -> None:
    """A UI-format workflow (nodes/links arrays) is not an API graph and is refused."""
    ui = {"nodes": [{"id": 1, "type": "LoadImage"}], "links": []}
    assert "not an API-format ComfyUI graph" in load_error(write_dir(templates={"t.json": ui}))


@pytest.mark.parametrize("title", ["input_image", "output"])
def test_missing_required_title(write_dir: WriteDir, title: str) -> None:
    """A template without a required title is refused, naming the title."""
    template = real_template()
    for node in template.values():
        if node.get("_meta", {}).get("title") == title:
            del node["_meta"]
    message = load_error(write_dir(templates={"t.json": template}))
    assert f"t.json: no node titled '{title}'" in message


def test_duplicate_titles(write_dir: WriteDir) -> None:
    """Two nodes with the same title are refused, naming both ids."""
    template = real_template()
    template["5"]["_meta"] = {"title": "sampler"}
    message = load_error(write_dir(templates={"t.json": template}))
    assert "title 'sampler' is used by nodes '5' and '6'" in message


def test_bound_node_lacks_input(write_dir: WriteDir) -> None:
    """A bound node missing an input its title binds (sampler without denoise) is refused."""
    template = real_template()
    del template["6"]["inputs"]["denoise"]
    message = load_error(write_dir(templates={"t.json": template}))
    assert "node 'sampler' (id '6', KSampler) lacks input(s) denoise" in message


def test_link_to_missing_node(write_dir: WriteDir) -> None:
    """An input linking to a node id that does not exist is refused, naming node and input."""
    template = real_template()
    template["7"]["inputs"]["samples"] = ["66", 0]
    message = load_error(write_dir(templates={"t.json": template}))
    assert "node '7' (VAEDecode) input 'samples' links to node '66'" in message


def test_link_with_bad_index(write_dir: WriteDir) -> None:
    """A link whose output index is not a non-negative int is refused."""
    template = real_template()
    template["7"]["inputs"]["samples"] = ["6", -1]
    assert "output index -1" in load_error(write_dir(templates={"t.json": template}))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['[styles.clay.overrides."upscaler"]', "width = 2"], "override of node titled 'upscaler'"),
        (['[styles.clay.overrides."sampler"]', "stepz = 2"], "override of input 'stepz'"),
        (['[styles.clay.overrides."sampler"]', "seed = 2"], "input 'seed' is set per task"),
        (['[styles.clay.overrides."output"]', 'filename_prefix = "x"'], "is set per task"),
        (['[styles.clay.overrides."sampler"]', 'model = "x"'], "input 'model' is a link"),
    ],
)
def test_bad_overrides(write_dir: WriteDir, lines: list[str], expected: str) -> None:
    """Overrides of missing nodes or inputs, per-task inputs or links are refused."""
    message = load_error(write_dir(with_style_lines(*lines)))
    assert "style 'clay'" in message
    assert expected in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("strength = 1.5", "strength: Input should be less than or equal to 1"),
        ("strength = 0.0", "strength: Input should be greater than 0"),
        ("steps = 0", "steps: Input should be greater than or equal to 1"),
        ('steps = "20"', "steps: Input should be a valid integer"),
        ("cfg = -1.0", "cfg: Input should be greater than 0"),
        ('sampler_name = ""', "sampler_name: String should have at least 1 character"),
        ("strenght = 0.5", "strenght: Extra inputs are not permitted"),
    ],
)
def test_bad_defaults(write_dir: WriteDir, line: str, expected: str) -> None:
    """Out-of-range, mistyped or unknown style keys are refused, naming the key."""
    message = load_error(write_dir(with_style_lines(line)))
    assert "styles.toml" in message
    assert expected in message


def test_override_of_strength_is_checked_too(write_dir: WriteDir) -> None:
    """A bound-input override (sampler.denoise) goes through the same limits as `strength`."""
    message = load_error(
        write_dir(with_style_lines('[styles.clay.overrides."sampler"]', "denoise = 2.0"))
    )
    assert "style 'clay': strength: Input should be less than or equal to 1" in message


def test_missing_field_without_default(write_dir: WriteDir) -> None:
    """A style that ends up without a prompt (none in it, none in [defaults]) is refused."""
    manifest = MINIMAL_MANIFEST.replace('prompt = "Clay Style, lovely, 3d, cute"', "steps = 5")
    assert "style 'clay': prompt: Field required" in load_error(write_dir(manifest))


@pytest.mark.parametrize("name", ["Clay", "clay style", "x" * 65])
def test_bad_style_name(write_dir: WriteDir, name: str) -> None:
    """Style names must be short lowercase identifiers (they appear in routing and metrics)."""
    manifest = MINIMAL_MANIFEST.replace("[styles.clay]", f'[styles."{name}"]')
    assert "String should match pattern" in load_error(write_dir(manifest))


def test_first_error_names_the_failing_style(write_dir: WriteDir) -> None:
    """With several styles, the message names the broken one, not its neighbours."""
    manifest = MINIMAL_MANIFEST + '\n[styles.anime]\nprompt = "A"\ntemplate = "gone.json"\n'
    templates: dict[str, Any] = {"t.json": real_template()}
    assert "style 'anime'" in load_error(write_dir(manifest, templates))
