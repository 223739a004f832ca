"""Fault switches of the ComfyUI emulator (mutable at run time, read by the executor and routes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Faults:
    """What the emulator does differently from a healthy ComfyUI; change fields at any time."""

    step_seconds: float = 0.0
    """Wall time of each KSampler step."""
    model_load_seconds: float = 0.0
    """Time of a cold checkpoint load: CheckpointLoaderSimple runs (is not cached) and this
    machine has not read that file before (emulator_models)."""
    model_reload_seconds: float | None = None
    """Time of a checkpoint load whose file this machine read before (the OS page cache);
    None: `RELOAD_FRACTION` (0.32, measured) x `model_load_seconds`."""
    lora_load_seconds: float | None = None
    """Time of a LoRA file read by LoraLoader / LoraLoaderModelOnly; None: `LORA_FRACTION`
    (0.1, estimated) x `model_load_seconds`."""
    node_seconds: float = 0.0
    """Minimum wall time of every node that executes (not cached): makes prompts slow enough
    to race (interrupt, reconnect) deterministically without huge images."""
    execution_error_at: str | None = None
    """Node class_type or node id whose execution raises (an `execution_error` event)."""
    drop_ws_after_steps: int | None = None
    """Close every WebSocket after this many sampler steps of a prompt; fires once, then resets."""
    reject_prompts_with_500: bool = False
    """POST /prompt answers 500 text, as ComfyUI does when its handler raises."""
    history_delay_s: float = 0.0
    """/history is written this long after `execution_success` (and `status`,
    `executing {node: null}` follow the write, as in ComfyUI)."""
    hang: bool = False
    """Accept prompts, start them, and never finish (the first node never returns)."""
