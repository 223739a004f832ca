"""Fixtures for the emulator's own tests: a running emulator and a recording client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consumer.testing import ComfyEmulator, Faults
from tests.emulator.scenarios import Message, Socket, Trace, http, png_bytes, upload_form


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[ComfyEmulator]:
    """A running emulator with its own folders."""
    async with ComfyEmulator(Faults(), tmp_path) as emulator:
        yield emulator


class Client:
    """One HTTP session plus one socket (clientId `cid`); every frame lands in `trace`."""

    def __init__(self, url: str, session: aiohttp.ClientSession, cid: str) -> None:
        self.url, self.session, self.cid = url, session, cid
        self.trace = Trace(cid)
        self.socket = Socket(self.trace, session, url, cid)

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await http(self.trace, self.session, "GET", self.url, path, **kw)

    async def post(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await http(self.trace, self.session, "POST", self.url, path, **kw)

    async def submit(self, prompt: dict[str, Any], **extra: Any) -> str:
        body = {"prompt": prompt, "client_id": self.cid, **extra}
        status, answer = await self.post("/prompt", json=body)
        assert status == 200, answer
        return str(answer["prompt_id"])

    async def upload(self, name: str = "src.png", color: tuple[int, ...] = (200, 40, 40)) -> str:
        _, answer = await self.post("/upload/image", data=upload_form(png_bytes(color), name, None))
        return f"{answer['subfolder']}/{answer['name']}"

    def messages(self, kind: str | None = None, pid: str | None = None) -> list[Message]:
        found = self.trace.messages()
        if kind is not None:
            found = [m for m in found if m["type"] == kind]
        if pid is not None:
            found = [m for m in found if m["data"].get("prompt_id") == pid]
        return found

    async def wait(self, pred: Callable[[Message], bool], timeout_s: float = 10.0) -> None:
        assert await self.trace.wait_for(pred, timeout_s=timeout_s), "timed out"

    async def wait_done(self, pid: str, timeout_s: float = 10.0) -> None:
        def done(m: Message) -> bool:
            data = m["data"]
            return (
                m["type"] == "executing"
                and data.get("node") is None
                and data.get("prompt_id") == pid
            )

        await self.wait(done, timeout_s)

    async def history(self, pid: str) -> dict[str, Any]:
        _, answer = await self.get(f"/history/{pid}")
        return dict(answer)


@pytest.fixture
async def connect(comfy: ComfyEmulator) -> AsyncIterator[Callable[..., Any]]:
    """connect(cid=None) -> a Client whose socket is open (status received)."""
    session = aiohttp.ClientSession()
    clients: list[Client] = []

    async def open_client(cid: str | None = None) -> Client:
        client = Client(comfy.url, session, cid or uuid.uuid4().hex)
        await client.socket.open()
        clients.append(client)
        return client

    yield open_client
    for client in reversed(clients):
        await client.socket.close()
    await session.close()


def invert(image: str, prefix: str = "t/inv") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def img2img(image: str, **sampler: Any) -> dict[str, Any]:
    """The template shape of our styles, with KSampler inputs overridable."""
    inputs = {"model": ["2", 0], "seed": 1, "steps": 3, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0],
              "latent_image": ["5", 0], "denoise": 0.6}  # fmt: skip
    text = sampler.pop("text", "a watercolor fox")
    ckpt = sampler.pop("ckpt", "v1-5-pruned-emaonly.safetensors")
    inputs.update(sampler)
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 1]}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "6": {"class_type": "KSampler", "inputs": inputs},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 2]}},
        "8": {
            "class_type": "SaveImage",
            "inputs": {"images": ["7", 0], "filename_prefix": "t/out"},
        },
    }
