"""Model-free image nodes of the emulator, with ComfyUI's input names, done with Pillow.

IMAGE values are lists of RGB `PIL.Image` (a batch), MASK values lists of "L" images.
Pillow work runs in a thread so the event loop keeps serving HTTP and WebSocket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageChops, ImageFilter, ImageOps

from consumer.testing.emulator_nodes import (
    InputTypes,
    NodeContext,
    NodeDef,
    NodeEnv,
    NodeExecutionError,
    NodeResult,
)

Batch = list[Image.Image]
MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]
DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]
POST_PROCESSING = "comfy_extras.nodes_post_processing"
V3_INFO: dict[str, Any] = {
    "is_input_list": False,
    "output_tooltips": [None],
    "output_matchtypes": None,
    "deprecated": False,
    "experimental": False,
    "dev_only": False,
    "api_node": False,
    "price_badge": None,
    "search_aliases": None,
}
"""Extra keys of V3 (comfy_api.latest) nodes: /object_info is `asdict(NodeInfoV1)`, Nones kept.
Which fields 0.8.0's NodeInfoV1 has is inferred from neighbouring versions, not from a trace."""
V3_IMAGE = ["IMAGE", {}]


def _int(default: int, low: int, high: int, **extra: Any) -> list[Any]:
    return ["INT", {"default": default, "min": low, "max": high, "step": 1, **extra}]


def _float(default: float, low: float, high: float, step: float) -> list[Any]:
    return ["FLOAT", {"default": default, "min": low, "max": high, "step": step}]


def _v3_combo(options: list[str]) -> list[Any]:
    return ["COMBO", {"options": options, "multiselect": False}]


def _required(**inputs: list[Any]) -> Callable[[NodeEnv], InputTypes]:
    return lambda _env: {"required": dict(inputs)}


async def _map_batch(fn: Callable[[Image.Image], Image.Image], batch: Batch) -> Batch:
    return await asyncio.to_thread(lambda: [fn(image) for image in batch])


def check_reflect_padding(batch: Batch, radius: int) -> None:
    """torch's reflect padding fails like this when the radius reaches the image size."""
    width, height = batch[0].size
    for dimension, size in ((3, width), (2, height)):
        if radius >= size:
            shape = f"[{len(batch)}, 3, {height}, {width}]"
            raise NodeExecutionError(
                "Argument #4: Padding size should be less than the corresponding input dimension,"
                f" but got: padding ({radius}, {radius}) at dimension {dimension} of input {shape}"
            )


async def _empty_image(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    color = int(args["color"])
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    size = (int(args["width"]), int(args["height"]))
    batch = [Image.new("RGB", size, rgb) for _ in range(int(args["batch_size"]))]
    return NodeResult((batch,))


async def _invert(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    return NodeResult((await _map_batch(ImageOps.invert, args["image"]),))


def _target_size(image: Image.Image, width: int, height: int) -> tuple[int, int]:
    if width == 0:
        width = max(1, round(image.width * height / image.height))
    if height == 0:
        height = max(1, round(image.height * width / image.width))
    return width, height


def _center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    old_aspect, new_aspect = image.width / image.height, width / height
    if old_aspect > new_aspect:
        keep = round(image.width * (new_aspect / old_aspect))
        left = (image.width - keep) // 2
        return image.crop((left, 0, left + keep, image.height))
    keep = round(image.height * (old_aspect / new_aspect))
    top = (image.height - keep) // 2
    return image.crop((0, top, image.width, top + keep))


def scale(image: Image.Image, size: tuple[int, int], method: str, crop: str) -> Image.Image:
    """comfy.utils.common_upscale for one image."""
    if crop == "center":
        image = _center_crop(image, *size)
    return image.resize(size, _RESAMPLE[method])


async def _image_scale(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    width, height = int(args["width"]), int(args["height"])
    batch: Batch = args["image"]
    if width == 0 and height == 0:
        return NodeResult((batch,))
    size = _target_size(batch[0], width, height)
    method, crop = args["upscale_method"], args["crop"]
    return NodeResult((await _map_batch(lambda im: scale(im, size, method, crop), batch),))


async def _image_scale_by(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    batch: Batch = args["image"]
    factor = float(args["scale_by"])
    size = (round(batch[0].width * factor), round(batch[0].height * factor))
    method = args["upscale_method"]
    return NodeResult((await _map_batch(lambda im: scale(im, size, method, "disabled"), batch),))


async def _blur(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    batch: Batch = args["image"]
    radius, sigma = int(args["blur_radius"]), float(args["sigma"])
    if radius == 0:
        return NodeResult((batch,))
    check_reflect_padding(batch, radius)
    blur = ImageFilter.GaussianBlur(sigma)
    return NodeResult((await _map_batch(lambda im: im.filter(blur), batch),))


async def _sharpen(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    batch: Batch = args["image"]
    radius, sigma, alpha = int(args["sharpen_radius"]), float(args["sigma"]), float(args["alpha"])
    if radius == 0:
        return NodeResult((batch,))
    check_reflect_padding(batch, radius)

    def sharpen(image: Image.Image) -> Image.Image:
        blurred = image.filter(ImageFilter.GaussianBlur(sigma))
        return Image.blend(blurred, image, 1.0 + 10.0 * alpha)

    return NodeResult((await _map_batch(sharpen, batch),))


def _quantize(image: Image.Image, colors: int, dither: str) -> Image.Image:
    palette = image.quantize(colors=colors)
    mode = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
    return image.quantize(colors=colors, palette=palette, dither=mode).convert("RGB")


async def _image_quantize(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    colors, dither = int(args["colors"]), str(args["dither"])
    return NodeResult((await _map_batch(lambda im: _quantize(im, colors, dither), args["image"]),))


_CHOPS: dict[str, Callable[[Image.Image, Image.Image], Image.Image]] = {
    "normal": lambda _a, b: b,
    "multiply": ImageChops.multiply,
    "screen": ImageChops.screen,
    "overlay": ImageChops.overlay,
    "soft_light": ImageChops.soft_light,
    "difference": ImageChops.difference,
}


async def _image_blend(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    first: Batch = args["image1"]
    second: Batch = args["image2"]
    factor, mode = float(args["blend_factor"]), str(args["blend_mode"])

    def blend(index: int) -> Image.Image:
        a = first[index]
        b = second[min(index, len(second) - 1)]
        if b.size != a.size:
            b = scale(b, a.size, "bicubic", "center")
        return Image.blend(a, _CHOPS[mode](a, b), factor)

    return NodeResult((await asyncio.to_thread(lambda: [blend(i) for i in range(len(first))]),))


IMAGE_NODES = [
    NodeDef(
        name="EmptyImage",
        display_name="EmptyImage",
        category="image",
        input_types=_required(
            width=_int(512, 1, MAX_RESOLUTION),
            height=_int(512, 1, MAX_RESOLUTION),
            batch_size=_int(1, 1, 4096),
            color=_int(0, 0, 0xFFFFFF, display="color"),
        ),
        outputs=("IMAGE",),
        run=_empty_image,
    ),
    NodeDef(
        name="ImageInvert",
        display_name="Invert Image",
        category="image",
        input_types=_required(image=["IMAGE"]),
        outputs=("IMAGE",),
        run=_invert,
    ),
    NodeDef(
        name="ImageScale",
        display_name="Upscale Image",
        category="image/upscaling",
        input_types=_required(
            image=["IMAGE"],
            upscale_method=[UPSCALE_METHODS],
            width=_int(512, 0, MAX_RESOLUTION),
            height=_int(512, 0, MAX_RESOLUTION),
            crop=[["disabled", "center"]],
        ),
        outputs=("IMAGE",),
        run=_image_scale,
    ),
    NodeDef(
        name="ImageScaleBy",
        display_name="Upscale Image By",
        category="image/upscaling",
        input_types=_required(
            image=["IMAGE"], upscale_method=[UPSCALE_METHODS], scale_by=_float(1.0, 0.01, 8.0, 0.01)
        ),
        outputs=("IMAGE",),
        run=_image_scale_by,
    ),
    NodeDef(
        name="ImageBlur",
        display_name="Image Blur",
        category="image/postprocessing",
        python_module=POST_PROCESSING,
        extra_info=V3_INFO,
        input_types=_required(
            image=V3_IMAGE, blur_radius=_int(1, 1, 31), sigma=_float(1.0, 0.1, 10.0, 0.1)
        ),
        outputs=("IMAGE",),
        run=_blur,
    ),
    NodeDef(
        name="ImageSharpen",
        display_name="Image Sharpen",
        category="image/postprocessing",
        python_module=POST_PROCESSING,
        extra_info=V3_INFO,
        input_types=_required(
            image=V3_IMAGE,
            sharpen_radius=_int(1, 1, 31),
            sigma=_float(1.0, 0.1, 10.0, 0.01),
            alpha=_float(1.0, 0.0, 5.0, 0.01),
        ),
        outputs=("IMAGE",),
        run=_sharpen,
    ),
    NodeDef(
        name="ImageQuantize",
        display_name="Image Quantize",
        category="image/postprocessing",
        python_module=POST_PROCESSING,
        extra_info=V3_INFO,
        input_types=_required(image=V3_IMAGE, colors=_int(256, 1, 256), dither=_v3_combo(DITHERS)),
        outputs=("IMAGE",),
        run=_image_quantize,
    ),
    NodeDef(
        name="ImageBlend",
        display_name="Image Blend",
        category="image/postprocessing",
        python_module=POST_PROCESSING,
        extra_info=V3_INFO,
        input_types=_required(
            image1=V3_IMAGE,
            image2=V3_IMAGE,
            blend_factor=_float(0.5, 0.0, 1.0, 0.01),
            blend_mode=_v3_combo(BLEND_MODES),
        ),
        outputs=("IMAGE",),
        run=_image_blend,
    ),
]
