# ruff: noqa: E501 - one node per line reads best in these graphs
"""The emulated nodes run for real: image nodes with Pillow, the SD chain deterministically."""

from __future__ import annotations

from io import BytesIO

from PIL import Image

from consumer.testing.emulator_diffusion_nodes import stylize
from tests.emulator.conftest import img2img
from tests.emulator.scenarios import png_bytes


def _all_image_nodes(image: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 30, "batch_size": 1, "color": 0x336699}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "lanczos", "width": 0, "height": 30, "crop": "center"}},
        "4": {"class_type": "ImageScaleBy", "inputs": {"image": ["3", 0], "upscale_method": "area", "scale_by": 0.5}},
        "5": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 3, "sigma": 1.0}},
        "6": {"class_type": "ImageSharpen", "inputs": {"image": ["5", 0], "sharpen_radius": 2, "sigma": 1.0, "alpha": 0.5}},
        "7": {"class_type": "ImageQuantize", "inputs": {"image": ["6", 0], "colors": 4, "dither": "floyd-steinberg"}},
        "8": {"class_type": "ImageBlend", "inputs": {"image1": ["7", 0], "image2": ["4", 0], "blend_factor": 0.5, "blend_mode": "screen"}},
        "9": {"class_type": "ImageInvert", "inputs": {"image": ["8", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "t/all"}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }  # fmt: skip


async def test_every_image_node_runs(connect):
    """A graph through every image node succeeds; SaveImage writes output/, PreviewImage temp/."""
    client = await connect()
    image = await client.upload()
    pid = await client.submit(_all_image_nodes(image))
    await client.wait_done(pid)
    entry = (await client.history(pid))[pid]
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved, preview = entry["outputs"]["10"]["images"][0], entry["outputs"]["11"]["images"][0]
    assert (saved["filename"], saved["subfolder"], saved["type"]) == (
        "all_00001_.png",
        "t",
        "output",
    )
    assert preview["type"] == "temp"
    assert preview["filename"].startswith("ComfyUI_temp_")


async def test_empty_latent_text_to_image(connect):
    """EmptyLatentImage -> KSampler(denoise 1) -> VAEDecode gives an image of the latent size."""
    client = await connect()
    prompt = img2img("unused", denoise=1.0)
    prompt["5"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 2},
    }
    del prompt["1"]
    pid = await client.submit(prompt)
    await client.wait_done(pid)
    images = (await client.history(pid))[pid]["outputs"]["8"]["images"]
    assert len(images) == 2


def test_stylize_is_deterministic_and_follows_text_and_denoise():
    """Same inputs -> same pixels; other text -> other pixels; denoise 0 -> the input."""
    source = Image.open(BytesIO(png_bytes((120, 80, 200), (32, 32)))).convert("RGB")
    a = stylize(source, "watercolor", "m.safetensors", 1, 0.7).tobytes()
    assert a == stylize(source, "watercolor", "m.safetensors", 1, 0.7).tobytes()
    assert a != stylize(source, "oil painting", "m.safetensors", 1, 0.7).tobytes()
    assert stylize(source, "watercolor", "m.safetensors", 1, 0.0).tobytes() == source.tobytes()
