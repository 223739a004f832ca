"""Fixtures for the ComfyUI client and pool: the emulator, or a real server via COMFYUI_TEST_URL.

With `COMFYUI_TEST_URL=http://host:8188` the client tests run against that server and every
test marked `emulator_only` (fault injection) is skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from consumer.comfy import ComfyClient
from consumer.testing.comfyui_emulator import ComfyEmulator
from tests.comfy.helpers import FAST, REAL_URL


@pytest.fixture(autouse=True)
def _skip_emulator_only_on_a_real_server(request: pytest.FixtureRequest) -> None:
    if REAL_URL and request.node.get_closest_marker("emulator_only"):
        pytest.skip("needs the emulator (faults or several servers): COMFYUI_TEST_URL is set")


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[ComfyEmulator]:
    """A fresh emulator on 127.0.0.1, port 0."""
    async with ComfyEmulator(output_dir=tmp_path / "comfy") as emu:
        yield emu


@pytest.fixture
async def comfy_url(tmp_path: Path) -> AsyncIterator[str]:
    """The server the client tests talk to: COMFYUI_TEST_URL, else an emulator."""
    if REAL_URL:
        yield REAL_URL.rstrip("/")
        return
    async with ComfyEmulator(output_dir=tmp_path / "comfy") as emu:
        yield emu.url


@pytest.fixture
async def client(comfy_url: str) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(comfy_url, timeouts=FAST) as comfy:
        assert await comfy.wait_connected()
        yield comfy
