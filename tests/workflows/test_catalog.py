"""Loading the shipped styles and rendering prompts from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from consumer.errors import UnsupportedStyle
from consumer.workflows import RenderParams, Style, StyleCatalog
from tests.workflows.conftest import WriteDir
from tests.workflows.graphs import MINIMAL_MANIFEST, WORKFLOWS_DIR, node_by_title, real_template

PRESETS = {
    "clay": "Clay Style, lovely, 3d, cute",
    "anime": "Anime Style, beautiful, detailed",
    "realistic": "Realistic Style, high quality, detailed",
    "cartoon": "Cartoon Style, colorful, fun",
    "oil_painting": "Oil Painting Style, artistic, classical",
}
PARAMS = RenderParams(image="style-consumer/in.png", seed=42, filename_prefix="style-consumer/t1")


@pytest.fixture(scope="module")
def catalog() -> StyleCatalog:
    """The catalog of the shipped workflows directory."""
    return StyleCatalog.load(WORKFLOWS_DIR)


def test_shipped_styles_have_the_original_presets(catalog: StyleCatalog) -> None:
    """The five styles of the original design load with their preset prompts."""
    assert set(catalog.names()) == set(PRESETS)
    assert {name: catalog.get(name).prompt for name in PRESETS} == PRESETS


def test_shipped_styles_have_sane_defaults(catalog: StyleCatalog) -> None:
    """Every shipped style names a checkpoint and an img2img graph with the expected nodes."""
    for name in catalog.names():
        style = catalog.get(name)
        assert style.checkpoint == "v1-5-pruned-emaonly.safetensors"
        assert 0 < style.strength <= 1
        assert style.negative_prompt
        assert style.required_node_classes == {
            "LoadImage", "CheckpointLoaderSimple", "CLIPTextEncode", "VAEEncode",
            "KSampler", "VAEDecode", "SaveImage",
        }  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_render_fills_bound_inputs_by_title(catalog: StyleCatalog, name: str) -> None:
    """Rendering sets image, prompts, seed, denoise, sampler settings and filename prefix."""
    style = catalog.get(name)
    graph = style.render(PARAMS)
    assert node_by_title(graph, "input_image")["inputs"]["image"] == PARAMS.image
    assert node_by_title(graph, "output")["inputs"]["filename_prefix"] == PARAMS.filename_prefix
    assert node_by_title(graph, "positive_prompt")["inputs"]["text"] == PRESETS[name]
    assert node_by_title(graph, "negative_prompt")["inputs"]["text"] == style.negative_prompt
    assert node_by_title(graph, "checkpoint")["inputs"]["ckpt_name"] == style.checkpoint
    sampler = node_by_title(graph, "sampler")["inputs"]
    expected = (PARAMS.seed, style.strength, style.steps, style.cfg, style.sampler_name)
    assert (sampler["seed"], sampler["denoise"], sampler["steps"], sampler["cfg"],
            sampler["sampler_name"]) == expected  # fmt: skip
    assert sampler["scheduler"] == style.scheduler


def test_render_uses_request_values_over_presets(catalog: StyleCatalog) -> None:
    """A custom prompt, negative prompt and strength replace the style's presets."""
    params = RenderParams(
        image="a.png",
        seed=7,
        filename_prefix="p",
        prompt="mine",
        negative_prompt="no",
        strength=0.3,
    )
    graph = catalog.get("anime").render(params)
    assert node_by_title(graph, "positive_prompt")["inputs"]["text"] == "mine"
    assert node_by_title(graph, "negative_prompt")["inputs"]["text"] == "no"
    assert node_by_title(graph, "sampler")["inputs"]["denoise"] == 0.3


def test_render_is_pure(catalog: StyleCatalog) -> None:
    """Rendering returns a new graph each time and never changes the style's template."""
    style = catalog.get("clay")
    first = style.render(PARAMS)
    node_by_title(first, "sampler")["inputs"]["steps"] = 999
    second = style.render(PARAMS)
    assert first is not second
    assert node_by_title(second, "sampler")["inputs"]["steps"] == style.steps
    assert json.dumps(second) == json.dumps(style.render(PARAMS))


def test_render_output_is_json_for_the_api(catalog: StyleCatalog) -> None:
    """The rendered prompt survives a JSON round trip unchanged (what POST /prompt sends)."""
    graph = catalog.get("oil_painting").render(PARAMS)
    assert json.loads(json.dumps(graph)) == graph


def test_unknown_style_is_unsupported(catalog: StyleCatalog) -> None:
    """Asking for a style the manifest lacks raises UnsupportedStyle naming the known ones."""
    with pytest.raises(UnsupportedStyle, match=r"'pixel_art'.*known: clay"):
        catalog.get("pixel_art")
    assert "pixel_art" not in catalog
    assert "clay" in catalog


def test_binding_ignores_node_ids(write_dir: WriteDir) -> None:
    """A template whose node ids are renumbered and shuffled still binds by title."""
    template = real_template()
    new_ids = {old: f"n{99 - int(old)}" for old in template}
    shuffled = {}
    for old in reversed(list(template)):
        node = template[old]
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = [new_ids[value[0]], value[1]]
        shuffled[new_ids[old]] = node
    style = StyleCatalog.load(write_dir(templates={"t.json": shuffled})).get("clay")
    graph = style.render(PARAMS)
    assert node_by_title(graph, "input_image")["inputs"]["image"] == PARAMS.image
    assert node_by_title(graph, "sampler")["inputs"]["seed"] == 42
    assert node_by_title(graph, "sampler")["inputs"]["positive"] == ["n96", 0]


def test_overrides_set_inputs_and_style_fields(write_dir: WriteDir) -> None:
    """An override of a bound input updates the style's field; others set the node input."""
    template = real_template()
    template["9"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["1", 0], "upscale_method": "area", "width": 0, "height": 0,
                   "crop": "disabled"},
        "_meta": {"title": "resize"},
    }  # fmt: skip
    manifest = MINIMAL_MANIFEST + (
        '[styles.clay.overrides."sampler"]\nsteps = 30\n'
        '[styles.clay.overrides."resize"]\nwidth = 512\n'
    )
    style = StyleCatalog.load(write_dir(manifest, {"t.json": template})).get("clay")
    assert style.steps == 30
    graph = style.render(PARAMS)
    assert node_by_title(graph, "sampler")["inputs"]["steps"] == 30
    assert node_by_title(graph, "resize")["inputs"]["width"] == 512
    assert "ImageScale" in style.required_node_classes


def test_styles_inherit_defaults_and_override_them(write_dir: WriteDir) -> None:
    """Keys a style leaves out come from [defaults]; keys it sets win."""
    manifest = MINIMAL_MANIFEST + '\n[styles.ink]\nprompt = "Ink"\ncheckpoint = "ink.safetensors"\n'
    catalog = StyleCatalog.load(write_dir(manifest))
    ink, clay = catalog.get("ink"), catalog.get("clay")
    assert (ink.checkpoint, clay.checkpoint) == (
        "ink.safetensors",
        "v1-5-pruned-emaonly.safetensors",
    )
    assert (ink.steps, ink.cfg, ink.negative_prompt) == (10, 6.5, "ugly")
    assert (
        node_by_title(ink.render(PARAMS), "checkpoint")["inputs"]["ckpt_name"] == "ink.safetensors"
    )


def test_adding_a_style_is_adding_files(tmp_path: Path) -> None:
    """A copy of the workflows dir with one more style and template serves it without code."""
    directory = tmp_path / "wf"
    shutil.copytree(WORKFLOWS_DIR, directory)
    (directory / "templates" / "sketch.json").write_text(json.dumps(real_template()))
    with (directory / "styles.toml").open("a", encoding="utf-8") as manifest:
        manifest.write('\n[styles.sketch]\ntemplate = "sketch.json"\nprompt = "Pencil Sketch"\n')
    catalog = StyleCatalog.load(directory)
    assert catalog.names()[-1] == "sketch"
    sketch: Style = catalog.get("sketch")
    assert sketch.template_name == "sketch.json"
    assert (
        node_by_title(sketch.render(PARAMS), "positive_prompt")["inputs"]["text"] == "Pencil Sketch"
    )


def test_optional_titles_may_be_absent(write_dir: WriteDir) -> None:
    """A graph with only input_image and output (no sampler, prompts) loads and renders."""
    template = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"},
              "_meta": {"title": "input_image"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "o"},
              "_meta": {"title": "output"}},
    }  # fmt: skip
    style = StyleCatalog.load(write_dir(templates={"t.json": template})).get("clay")
    graph = style.render(PARAMS)
    assert graph["1"]["inputs"]["image"] == PARAMS.image
    assert graph["3"]["inputs"]["filename_prefix"] == PARAMS.filename_prefix
    assert style.required_node_classes == {"LoadImage", "ImageInvert", "SaveImage"}
