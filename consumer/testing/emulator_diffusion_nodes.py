"""Emulated SD nodes: real input names and types, a deterministic Pillow "diffusion".

KSampler reports one progress step per `Faults.step_seconds`; the decoded image is the input
recoloured with a palette derived from the positive prompt (and checkpoint), posterized, nudged by
the seed and blended with the original by `denoise`: visibly styled, different per prompt text,
identical for identical inputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from consumer.testing.emulator_nodes import InputTypes, NodeContext, NodeDef, NodeEnv, NodeResult

Batch = list[Image.Image]
MAX_RESOLUTION = 16384
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2",
]  # fmt: skip
SCHEDULERS = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
    "linear_quadratic", "kl_optimal",
]  # fmt: skip
_LATENT_SCALE = 8


@dataclass(frozen=True)
class Checkpoint:
    """MODEL, CLIP and VAE outputs of CheckpointLoaderSimple."""

    name: str
    part: str


@dataclass(frozen=True)
class Conditioning:
    text: str
    checkpoint: str


@dataclass(frozen=True)
class Latent:
    images: Batch
    empty: bool = False


def _tip(kind: str, tooltip: str, **options: Any) -> list[Any]:
    return [kind, {**options, "tooltip": tooltip}]


def _checkpoint_types(env: NodeEnv) -> InputTypes:
    tip = "The name of the checkpoint (model) to load."
    return {"required": {"ckpt_name": [sorted(env.checkpoints), {"tooltip": tip}]}}


async def _load_checkpoint(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    """Runs only when not cached: every run reads the file (a cold or a page-cache read)."""
    name = str(args["ckpt_name"])
    await ctx.models.load_checkpoint(ctx.prompt_id, ctx.node_id, name)
    return NodeResult(tuple(Checkpoint(name, part) for part in ("MODEL", "CLIP", "VAE")))


async def _encode_text(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    clip: Checkpoint = args["clip"]
    return NodeResult(([Conditioning(str(args["text"]), clip.name)],))


def _crop_to_latent_grid(image: Image.Image) -> Image.Image:
    """comfy VAE.vae_encode_crop_pixels: centre-crop to multiples of 8."""
    width = image.width // _LATENT_SCALE * _LATENT_SCALE
    height = image.height // _LATENT_SCALE * _LATENT_SCALE
    left, top = (image.width % _LATENT_SCALE) // 2, (image.height % _LATENT_SCALE) // 2
    return image.crop((left, top, left + width, top + height))


async def _vae_encode(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    return NodeResult((Latent([_crop_to_latent_grid(im) for im in args["pixels"]]),))


async def _vae_decode(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    latent: Latent = args["samples"]
    return NodeResult((list(latent.images),))


async def _empty_latent(_ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    size = (int(args["width"]), int(args["height"]))
    batch = [Image.new("RGB", size, (128, 128, 128)) for _ in range(int(args["batch_size"]))]
    return NodeResult((Latent(batch, empty=True),))


def _palette(text: str, checkpoint: str) -> tuple[tuple[int, int, int], tuple[int, int, int], int]:
    digest = hashlib.sha256(f"{checkpoint}\n{text}".encode()).digest()
    dark = (digest[0] // 3, digest[1] // 3, digest[2] // 3)
    light = (170 + digest[3] // 3, 170 + digest[4] // 3, 170 + digest[5] // 3)
    return dark, light, 2 + digest[6] % 3


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).filter(
        ImageFilter.GaussianBlur(4)
    )


def stylize(
    image: Image.Image, text: str, checkpoint: str, seed: int, denoise: float
) -> Image.Image:
    """The emulated img2img: palette + posterize from the prompt, contrast from the seed."""
    dark, light, bits = _palette(text, checkpoint)
    styled = ImageOps.colorize(ImageOps.grayscale(image), black=dark, white=light)
    styled = ImageOps.posterize(styled, bits)
    styled = ImageEnhance.Contrast(styled).enhance(0.85 + (seed % 31) / 100)
    return Image.blend(image, styled, max(0.0, min(1.0, denoise)))


def _style_key(model: Checkpoint, positive: Conditioning) -> str:
    """The checkpoint name as the palette sees it; LoRAs on MODEL or CLIP change it."""
    if model.name == positive.checkpoint:
        return model.name
    return f"{model.name}\n{positive.checkpoint}"


async def _sample(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    steps = int(args["steps"])
    for step in range(1, steps + 1):
        await asyncio.sleep(ctx.faults.step_seconds)
        ctx.check_interrupt()
        await ctx.progress(step, steps)
    latent: Latent = args["latent_image"]
    positive: list[Conditioning] = args["positive"]
    seed, denoise = int(args["seed"]), float(args["denoise"])
    text, checkpoint = positive[0].text, _style_key(args["model"], positive[0])

    def run() -> Batch:
        bases = [
            _noise(im.size, seed + i) if latent.empty else im for i, im in enumerate(latent.images)
        ]
        return [stylize(im, text, checkpoint, seed, denoise) for im in bases]

    return NodeResult((Latent(await asyncio.to_thread(run)),))


def _sampler_types(_env: NodeEnv) -> InputTypes:
    return {
        "required": {
            "model": _tip("MODEL", "The model used for denoising the input latent."),
            "seed": _tip("INT", "The random seed used for creating the noise.", default=0, min=0,
                         max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
            "steps": _tip("INT", "The number of steps used in the denoising process.",
                          default=20, min=1, max=10000),
            "cfg": _tip("FLOAT", "The Classifier-Free Guidance scale balances creativity and "
                        "adherence to the prompt. Higher values result in images more closely "
                        "matching the prompt however too high values will negatively impact "
                        "quality.", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
            "sampler_name": [SAMPLERS, {"tooltip": "The algorithm used when sampling, this can "
                             "affect the quality, speed, and style of the generated output."}],
            "scheduler": [SCHEDULERS, {"tooltip": "The scheduler controls how noise is "
                          "gradually removed to form the image."}],
            "positive": _tip("CONDITIONING", "The conditioning describing the attributes you "
                             "want to include in the image."),
            "negative": _tip("CONDITIONING", "The conditioning describing the attributes you "
                             "want to exclude from the image."),
            "latent_image": _tip("LATENT", "The latent image to denoise."),
            "denoise": _tip("FLOAT", "The amount of denoising applied, lower values will "
                            "maintain the structure of the initial image allowing for image to "
                            "image sampling.", default=1.0, min=0.0, max=1.0, step=0.01),
        }
    }  # fmt: skip


DIFFUSION_NODES = [
    NodeDef(
        name="CheckpointLoaderSimple",
        display_name="Load Checkpoint",
        category="loaders",
        description="Loads a diffusion model checkpoint, diffusion models are used to denoise"
        " latents.",
        input_types=_checkpoint_types,
        outputs=("MODEL", "CLIP", "VAE"),
        output_tooltips=(
            "The model used for denoising latents.",
            "The CLIP model used for encoding text prompts.",
            "The VAE model used for encoding and decoding images to and from latent space.",
        ),
        run=_load_checkpoint,
    ),
    NodeDef(
        name="CLIPTextEncode",
        display_name="CLIP Text Encode (Prompt)",
        category="conditioning",
        description="Encodes a text prompt using a CLIP model into an embedding that can be used"
        " to guide the diffusion model towards generating specific images.",
        input_types=lambda _env: {
            "required": {
                "text": _tip(
                    "STRING", "The text to be encoded.", multiline=True, dynamicPrompts=True
                ),
                "clip": _tip("CLIP", "The CLIP model used for encoding the text."),
            }
        },
        outputs=("CONDITIONING",),
        output_tooltips=(
            "A conditioning containing the embedded text used to guide the diffusion model.",
        ),
        run=_encode_text,
    ),
    NodeDef(
        name="VAEEncode",
        display_name="VAE Encode",
        category="latent",
        input_types=lambda _env: {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
        outputs=("LATENT",),
        run=_vae_encode,
    ),
    NodeDef(
        name="VAEDecode",
        display_name="VAE Decode",
        category="latent",
        description="Decodes latent images back into pixel space images.",
        input_types=lambda _env: {
            "required": {
                "samples": _tip("LATENT", "The latent to be decoded."),
                "vae": _tip("VAE", "The VAE model used for decoding the latent."),
            }
        },
        outputs=("IMAGE",),
        output_tooltips=("The decoded image.",),
        run=_vae_decode,
    ),
    NodeDef(
        name="KSampler",
        display_name="KSampler",
        category="sampling",
        description="Uses the provided model, positive and negative conditioning to denoise the"
        " latent image.",
        input_types=_sampler_types,
        outputs=("LATENT",),
        output_tooltips=("The denoised latent.",),
        run=_sample,
    ),
    NodeDef(
        name="EmptyLatentImage",
        display_name="Empty Latent Image",
        category="latent",
        description="Create a new batch of empty latent images to be denoised via sampling.",
        input_types=lambda _env: {
            "required": {
                "width": _tip(
                    "INT",
                    "The width of the latent images in pixels.",
                    default=512,
                    min=16,
                    max=MAX_RESOLUTION,
                    step=8,
                ),
                "height": _tip(
                    "INT",
                    "The height of the latent images in pixels.",
                    default=512,
                    min=16,
                    max=MAX_RESOLUTION,
                    step=8,
                ),
                "batch_size": _tip(
                    "INT", "The number of latent images in the batch.", default=1, min=1, max=4096
                ),
            }
        },
        outputs=("LATENT",),
        output_tooltips=("The empty latent image batch.",),
        run=_empty_latent,
    ),
]
