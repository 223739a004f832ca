# ruff: noqa: E501 - the prompts are laid out like record.py's, to be compared by eye
"""Our scenario runner: the five scenarios of record.py, against any ComfyUI base URL.

Same requests, same order, same trace format (tests/data/comfyui-traces/README.md), so a
recording of the emulator can be compared with the recordings of a real ComfyUI 0.8.0. Where
record.py sleeps, this runner waits for the event it needs (a WebSocket message) instead.

    python -m tests.emulator.scenario_runs http://127.0.0.1:8188 OUTDIR [--img2img]
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from PIL import Image

Message = dict[str, Any]
WAIT_S = 120.0


def png_bytes(color: tuple[int, ...], size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png_bytes(size: tuple[int, int] = (256, 256)) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.randbytes(size[0] * size[1] * 3)).save(buf, "PNG")
    return buf.getvalue()


def random_color() -> tuple[int, int, int]:
    return (random.randrange(256), random.randrange(256), random.randrange(256))


class Trace:
    """Items in the order the client saw them; waiters are woken on every new item."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.monotonic()
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def add(self, kind: str, **fields: Any) -> None:
        t_ms = round((time.monotonic() - self.t0) * 1000, 1)
        self.items.append({"t_ms": t_ms, "kind": kind, **fields})
        async with self._changed:
            self._changed.notify_all()

    def messages(self, start: int = 0) -> list[Message]:
        return [it["message"] for it in self.items[start:] if it["kind"] == "ws_text"]

    async def wait_for(
        self, pred: Callable[[Message], bool], start: int = 0, timeout_s: float = WAIT_S
    ) -> bool:
        """Wait until a WebSocket message (from item `start` on) matches; note a timeout."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: any(map(pred, self.messages(start))))
        except TimeoutError:
            await self.add("note", text="timed out waiting")
            return False
        return True


def _payload(body: bytes, ctype: str) -> Any:
    if "json" in ctype:
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")
    if ctype.startswith("text") or not body:
        return body.decode(errors="replace")
    return {"binary_bytes": len(body), "content_type": ctype}


async def http(
    trace: Trace, session: aiohttp.ClientSession, method: str, url: str, path: str, **kw: Any
) -> tuple[int, Any]:
    async with session.request(method, url + path, **kw) as response:
        body = await response.read()
        ctype = response.headers.get("Content-Type", "")
        payload = _payload(body, ctype)
        await trace.add(
            "http",
            method=method,
            path=path,
            request=kw.get("json"),
            status=response.status,
            content_type=ctype,
            response=payload,
        )
        return response.status, payload


async def _read_ws(trace: Trace, ws: aiohttp.ClientWebSocketResponse) -> None:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await trace.add("ws_text", message=json.loads(msg.data))
        elif msg.type == aiohttp.WSMsgType.BINARY:
            head = msg.data[:8]
            event = struct.unpack(">I", head[:4])[0] if len(head) >= 4 else None
            second = struct.unpack(">I", head[4:8])[0] if len(head) >= 8 else None
            await trace.add("ws_binary", event_type=event, second_word=second, length=len(msg.data))
        else:
            await trace.add("ws_other", type=str(msg.type))
            break


class Socket:
    """One client socket whose frames go into the trace (a reader task we own and reap)."""

    def __init__(self, trace: Trace, session: aiohttp.ClientSession, url: str, cid: str) -> None:
        self.trace, self.session, self.url, self.cid = trace, session, url, cid
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        start = len(self.trace.items)
        self._ws = await self.session.ws_connect(f"{self.url}/ws?clientId={self.cid}")
        self._reader = asyncio.create_task(_read_ws(self.trace, self._ws))
        await self.trace.wait_for(lambda m: m.get("type") == "status", start)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader


def done_pred(pid: str) -> Callable[[Message], bool]:
    def pred(m: Message) -> bool:
        data = m.get("data", {})
        return (
            m.get("type") == "executing"
            and data.get("node") is None
            and data.get("prompt_id") == pid
        )

    return pred


def idle_pred(m: Message) -> bool:
    return m.get("type") == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0


def type_pred(kind: str, pid: str) -> Callable[[Message], bool]:
    return lambda m: m.get("type") == kind and m.get("data", {}).get("prompt_id") == pid


def invert_prompt(image_name: str, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}, "_meta": {"title": "input_image"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear",
                                                      "width": 64, "height": 48, "crop": "disabled"}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix},
              "_meta": {"title": "output"}},
    }  # fmt: skip


def slow_prompt(prefix: str, size: int = 2048) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 2,
                                                      "color": random.randrange(1 << 24)}},
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }  # fmt: skip


def img2img_prompt(image_name: str, ckpt: str, seed: int, prefix: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}, "_meta": {"title": "input_image"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}, "_meta": {"title": "checkpoint"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor painting of a lighthouse at dusk", "clip": ["2", 1]},
              "_meta": {"title": "positive_prompt"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["2", 1]},
              "_meta": {"title": "negative_prompt"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": seed, "steps": 4, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "denoise": 0.6},
              "_meta": {"title": "sampler"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix},
              "_meta": {"title": "output"}},
    }  # fmt: skip


def upload_form(data: bytes, filename: str, overwrite: str | None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=filename, content_type="image/png")
    form.add_field("subfolder", "trace")
    if overwrite is not None:
        form.add_field("overwrite", overwrite)
    return form
