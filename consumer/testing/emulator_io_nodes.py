"""LoadImage, SaveImage and PreviewImage of the emulator: files in input/, output/, temp/."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from consumer.testing.emulator_nodes import (
    InputTypes,
    NodeContext,
    NodeDef,
    NodeEnv,
    NodeExecutionError,
    NodeResult,
)

Batch = list[Image.Image]
_SAVE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_SAVE_DESCRIPTION = "Saves the input images to your ComfyUI output directory."
_PREFIX_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as"
    " %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
)


def _load_image_types(env: NodeEnv) -> InputTypes:
    return {"required": {"image": [env.dirs.input_images(), {"image_upload": True}]}}


def _validate_load_image(env: NodeEnv, args: dict[str, Any]) -> bool | str:
    path = env.dirs.annotated(str(args["image"]))
    if path is None or not path.is_file():
        return f"Invalid image file: {args['image']}"
    return True


def _load_image_hash(env: NodeEnv, args: dict[str, Any]) -> object:
    path = env.dirs.annotated(str(args["image"]))
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_frames(path: Path) -> tuple[Batch, Batch]:
    images: Batch = []
    masks: Batch = []
    with Image.open(path) as opened:
        for frame in ImageSequence.Iterator(opened):
            upright = ImageOps.exif_transpose(frame)
            if images and upright.size != images[0].size:
                continue
            images.append(upright.convert("RGB"))
            if "A" in upright.getbands():
                masks.append(ImageOps.invert(upright.getchannel("A")))
            else:
                masks.append(Image.new("L", (64, 64), 0))
    return images, masks


async def _load_image(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    path = ctx.env.dirs.annotated(str(args["image"]))
    if path is None or not path.is_file():
        raise NodeExecutionError(
            f"[Errno 2] No such file or directory: '{path}'", "FileNotFoundError"
        )
    images, masks = await asyncio.to_thread(_read_frames, path)
    return NodeResult((images, masks))


def next_counter(folder: Path, name: str) -> int:
    """folder_paths.get_save_image_path's counter: highest `<name>_NNNNN_` + 1."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_")
    if not folder.is_dir():
        return 1
    found = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return max(found, default=0) + 1


def _split_prefix(root: Path, prefix: str) -> tuple[Path, str, str]:
    """(folder, base name, subfolder) of a filename_prefix, refusing escapes like ComfyUI."""
    normalised = Path(prefix)
    subfolder = str(normalised.parent) if str(normalised.parent) != "." else ""
    folder = (root / subfolder).resolve()
    if not folder.is_relative_to(root.resolve()):
        raise NodeExecutionError(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {folder}\n         output_dir: {root}"
            f"\n         commonpath: {root}",
            "Exception",
        )
    return folder, normalised.name, subfolder


def _png_info(ctx: NodeContext) -> PngInfo:
    info = PngInfo()
    info.add_text("prompt", json.dumps(ctx.prompt))
    extra = ctx.extra_data.get("extra_pnginfo")
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            info.add_text(str(key), json.dumps(value))
    return info


def _write_batch(
    batch: Batch, folder: Path, name: str, info: PngInfo, compress_level: int
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    counter = next_counter(folder, name)
    names = []
    for index, image in enumerate(batch):
        filename = f"{name.replace('%batch_num%', str(index))}_{counter:05}_.png"
        image.save(folder / filename, pnginfo=info, compress_level=compress_level)
        names.append(filename)
        counter += 1
    return names


@dataclass(frozen=True)
class _Target:
    root: Path
    prefix: str
    kind: str
    compress_level: int


async def _save(ctx: NodeContext, batch: Batch, target: _Target) -> NodeResult:
    folder, name, subfolder = _split_prefix(target.root, target.prefix)
    info = _png_info(ctx)
    level, kind = target.compress_level, target.kind
    names = await asyncio.to_thread(_write_batch, batch, folder, name, info, level)
    images = [{"filename": n, "subfolder": subfolder, "type": kind} for n in names]
    return NodeResult((), {"images": images})


async def _save_image(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    prefix = str(args["filename_prefix"])
    return await _save(ctx, args["images"], _Target(ctx.env.dirs.output, prefix, "output", 4))


async def _preview_image(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    prefix = f"ComfyUI_temp_{suffix}"
    return await _save(ctx, args["images"], _Target(ctx.env.dirs.temp, prefix, "temp", 1))


IO_NODES = [
    NodeDef(
        name="LoadImage",
        display_name="Load Image",
        category="image",
        input_types=_load_image_types,
        outputs=("IMAGE", "MASK"),
        run=_load_image,
        validate=_validate_load_image,
        validate_args=("image",),
        is_changed=_load_image_hash,
    ),
    NodeDef(
        name="SaveImage",
        display_name="Save Image",
        category="image",
        description=_SAVE_DESCRIPTION,
        input_types=lambda _env: {
            "required": {
                "images": ["IMAGE", {"tooltip": "The images to save."}],
                "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": _PREFIX_TOOLTIP}],
            },
            "hidden": dict(_SAVE_HIDDEN),
        },
        outputs=(),
        run=_save_image,
        output_node=True,
    ),
    NodeDef(
        name="PreviewImage",
        display_name="Preview Image",
        category="image",
        description=_SAVE_DESCRIPTION,
        input_types=lambda _env: {"required": {"images": ["IMAGE"]}, "hidden": dict(_SAVE_HIDDEN)},
        outputs=(),
        run=_preview_image,
        output_node=True,
    ),
]
