"""Test doubles shipped with the service: the ComfyUI emulator.

Imported lazily so `python -m consumer.testing.comfyui_emulator` does not import itself twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer.testing.comfyui_emulator import ComfyEmulator, Faults

__all__ = ["ComfyEmulator", "Faults"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from consumer.testing import comfyui_emulator

        return getattr(comfyui_emulator, name)
    raise AttributeError(name)
