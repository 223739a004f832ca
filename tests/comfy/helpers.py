"""Shared helpers of the ComfyUI client and pool tests."""

from __future__ import annotations

import io
import os
import random
import uuid
from collections.abc import Sequence
from typing import Any

from PIL import Image

from consumer.comfy import ClientTimeouts, ComfyClient, InstancePool
from consumer.settings import ComfyInstanceSettings

REAL_URL = os.environ.get("COMFYUI_TEST_URL")

FAST = ClientTimeouts(
    connect_s=2.0,
    request_s=5.0,
    ws_reconnect_max_s=0.2,
    history_wait_s=1.0,
    outage_grace_s=0.6,
    ws_heartbeat_s=5.0,
)


def fast_pool(
    settings: Sequence[ComfyInstanceSettings], drain_grace_s: float = 30.0
) -> InstancePool:
    """A pool with the FAST client timeouts and quick health probes."""
    return InstancePool(
        settings,
        drain_grace_s=drain_grace_s,
        connect_timeout_s=FAST.connect_s,
        request_timeout_s=FAST.request_s,
        health_interval_s=0.1,
        breaker_max_backoff_s=0.4,
        ws_reconnect_max_s=FAST.ws_reconnect_max_s,
        history_wait_s=FAST.history_wait_s,
        outage_grace_s=FAST.outage_grace_s,
        ws_heartbeat_s=FAST.ws_heartbeat_s,
    )


def png_bytes(side: int = 16) -> bytes:
    """A small PNG of a random colour, so ComfyUI's cache never serves it."""
    colour = tuple(random.randrange(256) for _ in range(3))
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def invert_prompt(image: str) -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage: runs on a CPU-only ComfyUI too."""
    return {
        "1": {
            "class_type": "LoadImage",
            "inputs": {"image": image},
            "_meta": {"title": "input_image"},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": f"tests/inv-{uuid.uuid4().hex[:8]}"},
            "_meta": {"title": "output"},
        },
    }


def sampler_prompt(image: str, checkpoint: str, steps: int = 4) -> dict[str, Any]:
    """The img2img shape of our style templates (needs a checkpoint: emulator only)."""
    return {
        "1": {
            "class_type": "LoadImage",
            "inputs": {"image": image},
            "_meta": {"title": "input_image"},
        },
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "watercolor", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "seed": random.randrange(2**32),
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 0.6,
                "model": ["2", 0],
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 2]}},
        "8": {
            "class_type": "SaveImage",
            "inputs": {"images": ["7", 0], "filename_prefix": f"tests/smp-{uuid.uuid4().hex[:8]}"},
        },
    }


async def first_checkpoint(client: ComfyClient) -> str:
    info = await client.object_info()
    return str(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0][0])
