"""LoraLoader and LoraLoaderModelOnly of the emulator.

No recorded trace or protocol note holds their /object_info: these shapes follow ComfyUI's
nodes.py (LoraLoaderModelOnly subclasses LoraLoader, so it inherits its DESCRIPTION,
OUTPUT_TOOLTIPS, two of them for its one output, and CATEGORY, and has no entry in
NODE_DISPLAY_NAME_MAPPINGS, so its display name is its class name). Record /object_info of both
on the target ComfyUI before relying on the tooltips or display names.

Like ComfyUI's `load_lora`, zero strengths return the inputs without reading the file; a
LoRA applied to MODEL/CLIP changes its name, which the emulated sampler's palette follows.
"""

from __future__ import annotations

from typing import Any

from consumer.testing.emulator_diffusion_nodes import Checkpoint
from consumer.testing.emulator_nodes import InputTypes, NodeContext, NodeDef, NodeEnv, NodeResult

_DESCRIPTION = (
    "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are"
    " denoised such as applying styles. Multiple LoRA nodes can be linked together."
)
_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def _lora_types(env: NodeEnv) -> InputTypes:
    def strength(tip: str) -> list[Any]:
        return ["FLOAT", {**_STRENGTH, "tooltip": tip}]

    return {
        "required": {
            "model": ["MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}],
            "clip": ["CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}],
            "lora_name": [sorted(env.loras), {"tooltip": "The name of the LoRA."}],
            "strength_model": strength(
                "How strongly to modify the diffusion model. This value can be negative."
            ),
            "strength_clip": strength(
                "How strongly to modify the CLIP model. This value can be negative."
            ),
        }
    }


def _lora_model_only_types(env: NodeEnv) -> InputTypes:
    return {
        "required": {
            "model": ["MODEL"],
            "lora_name": [sorted(env.loras)],
            "strength_model": ["FLOAT", dict(_STRENGTH)],
        }
    }


def _patched(part: Checkpoint, lora: str, strength: float) -> Checkpoint:
    return part if strength == 0 else Checkpoint(f"{part.name}+{lora}:{strength:g}", part.part)


async def _apply(ctx: NodeContext, args: dict[str, Any], clip: Checkpoint | None) -> NodeResult:
    model: Checkpoint = args["model"]
    lora = str(args["lora_name"])
    strength_model = float(args["strength_model"])
    strength_clip = float(args.get("strength_clip", 0))
    if strength_model == 0 and strength_clip == 0:
        return NodeResult((model, clip))
    class_type = str(ctx.prompt[ctx.node_id]["class_type"])
    await ctx.models.load_lora(ctx.prompt_id, (ctx.node_id, class_type), lora)
    new_clip = None if clip is None else _patched(clip, lora, strength_clip)
    return NodeResult((_patched(model, lora, strength_model), new_clip))


async def _load_lora(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    return await _apply(ctx, args, args["clip"])


async def _load_lora_model_only(ctx: NodeContext, args: dict[str, Any]) -> NodeResult:
    result = await _apply(ctx, args, None)
    return NodeResult(result.outputs[:1])


_OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")

LORA_NODES = [
    NodeDef(
        name="LoraLoader",
        display_name="Load LoRA",
        category="loaders",
        description=_DESCRIPTION,
        input_types=_lora_types,
        outputs=("MODEL", "CLIP"),
        output_tooltips=_OUTPUT_TOOLTIPS,
        run=_load_lora,
    ),
    NodeDef(
        name="LoraLoaderModelOnly",
        display_name="LoraLoaderModelOnly",
        category="loaders",
        description=_DESCRIPTION,
        input_types=_lora_model_only_types,
        outputs=("MODEL",),
        output_tooltips=_OUTPUT_TOOLTIPS,
        run=_load_lora_model_only,
    ),
]
