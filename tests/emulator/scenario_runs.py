# ruff: noqa: E501 - the prompts are laid out like record.py's, to be compared by eye
"""The five (six with img2img) scenarios of record.py, step for step; see scenarios.py."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.emulator.scenarios import (
    Socket,
    Trace,
    done_pred,
    http,
    idle_pred,
    img2img_prompt,
    invert_prompt,
    noise_png_bytes,
    png_bytes,
    random_color,
    slow_prompt,
    type_pred,
    upload_form,
)

Items = list[dict[str, Any]]
IMG2IMG_CKPT_A = "random-sd15.safetensors"
IMG2IMG_CKPT_B = "random-sd15-b.safetensors"


async def scenario_happy(url: str) -> Items:
    tr = Trace("happy_path_invert")
    cid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        sock = Socket(tr, s, url, cid)
        await sock.open()
        form = upload_form(png_bytes(random_color()), "trace-src.png", "true")
        _, up = await http(tr, s, "POST", url, "/upload/image", data=form)
        name = f"{up['subfolder']}/{up['name']}"
        pid = str(uuid.uuid4())
        body = {
            "prompt": invert_prompt(name, "trace/inv-" + pid[:8]),
            "client_id": cid,
            "prompt_id": pid,
        }
        await http(tr, s, "POST", url, "/prompt", json=body)
        if await tr.wait_for(lambda m: m.get("type") == "execution_success"):
            await http(tr, s, "GET", url, f"/history/{pid}")  # race probe
        await tr.wait_for(done_pred(pid))
        _, hist = await http(tr, s, "GET", url, f"/history/{pid}")
        img = hist[pid]["outputs"]["4"]["images"][0]
        params = {"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]}
        await http(tr, s, "GET", url, "/view", params=params)
        pid2 = str(uuid.uuid4())
        body = {
            "prompt": invert_prompt(name, "trace/inv-" + pid[:8]),
            "client_id": cid,
            "prompt_id": pid2,
        }
        await http(tr, s, "POST", url, "/prompt", json=body)
        await tr.wait_for(done_pred(pid2))
        await http(tr, s, "GET", url, f"/history/{pid2}")
        await sock.close()
    return tr.items


async def _post_invalid_prompts(tr: Trace, s: aiohttp.ClientSession, url: str, cid: str) -> None:
    """Like record.py, the second body is mutated after it is sent (the trace keeps the object)."""
    bad_value = invert_prompt("trace/does-not-exist.png", "trace/bad")
    await http(tr, s, "POST", url, "/prompt", json={"prompt": bad_value, "client_id": cid})
    p = invert_prompt("x.png", "trace/bad")
    p["2"]["inputs"]["upscale_method"] = "not-a-method"
    empty = {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
    }
    p["1"] = empty
    await http(tr, s, "POST", url, "/prompt", json={"prompt": p, "client_id": cid})
    del p["2"]["inputs"]["width"]
    await http(tr, s, "POST", url, "/prompt", json={"prompt": p, "client_id": cid})
    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    await http(tr, s, "POST", url, "/prompt", json={"prompt": unknown, "client_id": cid})
    no_outputs = {"1": json.loads(json.dumps(empty))}
    await http(tr, s, "POST", url, "/prompt", json={"prompt": no_outputs, "client_id": cid})
    await http(tr, s, "POST", url, "/prompt", json={"client_id": cid})


def _sharpen_error_prompt() -> dict[str, Any]:
    color = random.randrange(1 << 24)
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageSharpen", "inputs": {"image": ["1", 0], "sharpen_radius": 31, "sigma": 1.0, "alpha": 1.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "trace/err"}},
    }  # fmt: skip


async def scenario_errors(url: str) -> Items:
    tr = Trace("errors")
    cid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        sock = Socket(tr, s, url, cid)
        await sock.open()
        await _post_invalid_prompts(tr, s, url, cid)
        headers = {"Content-Type": "application/json"}
        await http(tr, s, "POST", url, "/prompt", data=b"{not json", headers=headers)
        pid = str(uuid.uuid4())
        body = {"prompt": _sharpen_error_prompt(), "client_id": cid, "prompt_id": pid}
        await http(tr, s, "POST", url, "/prompt", json=body)
        await tr.wait_for(done_pred(pid))
        await http(tr, s, "GET", url, f"/history/{pid}")
        await http(tr, s, "GET", url, f"/history/{uuid.uuid4()}")
        await http(tr, s, "GET", url, "/view", params={"filename": "nope.png", "type": "output"})
        await http(tr, s, "GET", url, "/view", params={"filename": "nope.png", "type": "weird"})
        await sock.close()
    return tr.items


async def _submit_and_settle(
    tr: Trace, s: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> None:
    """POST a prompt our socket may not follow; wait until the queue is idle, read its history."""
    start = len(tr.items)
    await http(tr, s, "POST", url, "/prompt", json=body)
    await tr.wait_for(idle_pred, start)
    await http(tr, s, "GET", url, f"/history/{body['prompt_id']}")


async def scenario_queue(url: str) -> Items:
    tr = Trace("queue_interrupt_delete")
    cid, other = uuid.uuid4().hex, uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        sock = Socket(tr, s, url, cid)
        await sock.open()
        pids = [str(uuid.uuid4()) for _ in range(3)]
        for i, pid in enumerate(pids):
            body = {
                "prompt": slow_prompt(f"trace/slow{i}-{pid[:6]}"),
                "client_id": cid,
                "prompt_id": pid,
            }
            await http(tr, s, "POST", url, "/prompt", json=body)
        await tr.wait_for(type_pred("execution_start", pids[0]))
        await http(tr, s, "GET", url, "/prompt")
        await http(tr, s, "GET", url, "/queue")
        await http(tr, s, "POST", url, "/queue", json={"delete": [pids[2]]})
        await http(tr, s, "POST", url, "/interrupt", json={"prompt_id": pids[1]})
        await http(tr, s, "POST", url, "/interrupt", json={"prompt_id": pids[0]})
        await tr.wait_for(done_pred(pids[0]))
        await http(tr, s, "GET", url, f"/history/{pids[0]}")
        await tr.wait_for(done_pred(pids[1]), timeout_s=300)
        await http(tr, s, "GET", url, f"/history/{pids[1]}")
        await http(tr, s, "GET", url, f"/history/{pids[2]}")
        nocid = invert_prompt("trace/trace-src.png", "trace/nocid")
        await _submit_and_settle(tr, s, url, {"prompt": nocid, "prompt_id": str(uuid.uuid4())})
        foreign = invert_prompt("trace/trace-src.png", "trace/other")
        foreign["2"]["inputs"]["width"] = 32
        body = {"prompt": foreign, "client_id": other, "prompt_id": str(uuid.uuid4())}
        await _submit_and_settle(tr, s, url, body)
        await sock.close()
    return tr.items


async def scenario_misc(url: str) -> Items:
    tr = Trace("introspection_uploads")
    paths = ["/system_stats", "/prompt", "/queue", "/features", "/object_info/ImageInvert",
             "/object_info/LoadImage", "/object_info/NoSuchNode", "/api/prompt"]  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for path in paths:
            await http(tr, s, "GET", url, path)
        a, b = random_color(), random_color()
        name = f"dup-{uuid.uuid4().hex[:8]}.png"
        for color, overwrite in [(a, "false"), (a, "false"), (b, "false"), (b, "true")]:
            form = upload_form(png_bytes(color), name, overwrite)
            await http(tr, s, "POST", url, "/upload/image", data=form)
        form = aiohttp.FormData()
        form.add_field("subfolder", "trace")
        await http(tr, s, "POST", url, "/upload/image", data=form)
    return tr.items


async def scenario_reconnect(url: str) -> Items:
    tr = Trace("ws_reconnect_mid_prompt")
    cid = uuid.uuid4().hex
    async with aiohttp.ClientSession() as s:
        sock = Socket(tr, s, url, cid)
        await sock.open()
        pid = str(uuid.uuid4())
        body = {
            "prompt": slow_prompt("trace/rc-" + pid[:6], 1536),
            "client_id": cid,
            "prompt_id": pid,
        }
        await http(tr, s, "POST", url, "/prompt", json=body)
        await tr.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") == "2")
        await sock.close()
        await tr.add("note", text="socket closed by client; reconnecting with the same clientId")
        sock = Socket(tr, s, url, cid)
        await sock.open()
        await tr.wait_for(done_pred(pid), timeout_s=300)
        await http(tr, s, "GET", url, f"/history/{pid}")
        await sock.close()
    return tr.items


async def _fetch_output(tr: Trace, s: aiohttp.ClientSession, url: str, pid: str) -> None:
    _, hist = await http(tr, s, "GET", url, f"/history/{pid}")
    images = hist.get(pid, {}).get("outputs", {}).get("8", {}).get("images", [])
    if images:
        img = images[0]
        params = {"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]}
        await http(tr, s, "GET", url, "/view", params=params)


async def scenario_img2img(url: str) -> Items:
    tr = Trace("img2img_random_sd15")
    cid = uuid.uuid4().hex
    runs = [("checkpoint A, cold (includes model load)", IMG2IMG_CKPT_A, 1),
            ("checkpoint A again, other seed (model cached)", IMG2IMG_CKPT_A, 2),
            ("checkpoint B (model switch)", IMG2IMG_CKPT_B, 2)]  # fmt: skip
    async with aiohttp.ClientSession() as s:
        sock = Socket(tr, s, url, cid)
        await sock.open()
        await http(tr, s, "GET", url, "/object_info/CheckpointLoaderSimple")
        form = upload_form(noise_png_bytes(), "img2img-src.png", "true")
        _, up = await http(tr, s, "POST", url, "/upload/image", data=form)
        name = f"{up['subfolder']}/{up['name']}"
        pids = []
        for i, (what, ckpt, seed) in enumerate(runs):
            pid = str(uuid.uuid4())
            pids.append(pid)
            await tr.add("note", text=f"run {i + 1}: {what}; seed {seed}")
            prompt = img2img_prompt(name, ckpt, seed, f"trace/img2img-{pid[:8]}")
            body = {"prompt": prompt, "client_id": cid, "prompt_id": pid}
            await http(tr, s, "POST", url, "/prompt", json=body)
        for pid in pids:
            await tr.wait_for(done_pred(pid), timeout_s=900)
            await _fetch_output(tr, s, url, pid)
        await sock.close()
    return tr.items


Scenario = Callable[[str], Awaitable[Items]]
SCENARIOS: dict[str, Scenario] = {
    "happy_path_invert": scenario_happy,
    "introspection_uploads": scenario_misc,
    "errors": scenario_errors,
    "ws_reconnect_mid_prompt": scenario_reconnect,
    "queue_interrupt_delete": scenario_queue,
    "img2img_random_sd15": scenario_img2img,
}


async def record_all(url: str, out: Path, names: list[str]) -> None:
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    for name in names:
        print("running", name, flush=True)  # noqa: T201
        items = await SCENARIOS[name](url)
        text = json.dumps(items, indent=1)
        await asyncio.to_thread(out.joinpath(f"{name}.json").write_text, text)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    chosen = [n for n in SCENARIOS if n != "img2img_random_sd15" or "--img2img" in sys.argv]
    asyncio.run(record_all(args[0].rstrip("/"), Path(args[1]), chosen))
