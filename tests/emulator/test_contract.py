"""Contract tests: the emulator's answers and messages, shaped like ComfyUI's protocol reference."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
from PIL import Image

from consumer.testing import ComfyEmulator, Faults
from tests.emulator.conftest import img2img, invert
from tests.emulator.scenarios import idle_pred, png_bytes, upload_form

JSON = "application/json; charset=utf-8"


async def test_socket_without_client_id_gets_a_minted_sid(comfy, connect):
    """A socket without clientId still gets `status` with a fresh hex sid."""
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{comfy.url}/api/ws") as ws:
        first = await ws.receive_json()
    assert first["type"] == "status"
    assert len(first["data"]["sid"]) == 32
    assert first["data"]["status"] == {"exec_info": {"queue_remaining": 0}}


async def test_feature_flags_first_message_is_answered(comfy, connect):
    """A first `feature_flags` message is answered with the server's feature object."""
    client = await connect()
    await client.socket._ws.send_json({"type": "feature_flags", "data": {"x": True}})
    await client.wait(lambda m: m["type"] == "feature_flags")
    _, features = await client.get("/features")
    assert client.messages("feature_flags")[0]["data"] == features


async def test_api_twins_answer_like_the_plain_routes(comfy, connect):
    """Every route is also served under /api."""
    client = await connect()
    for path in [
        "/prompt",
        "/queue",
        "/history",
        "/system_stats",
        "/features",
        "/object_info/KSampler",
    ]:
        assert await client.get(path) == await client.get(f"/api{path}")


async def test_post_prompt_counts_every_post_and_answers_ints(connect):
    """`number` is an int counter that also counts rejected posts; caller numbers become floats."""
    client = await connect()
    image = await client.upload()
    await client.post("/prompt", json={"client_id": client.cid})
    _, first = await client.post("/prompt", json={"prompt": invert(image)})
    _, second = await client.post("/prompt", json={"prompt": invert(image), "number": 7})
    assert (first["number"], first["node_errors"]) == (1, {})
    assert second["number"] == 7.0
    assert isinstance(second["number"], float)


async def test_range_type_and_link_errors_have_comfyui_types(connect):
    """min/max, conversion and return-type violations give ComfyUI's per-input error types."""
    client = await connect()
    prompt = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 0, "height": 99999, "batch_size": "x", "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t/x"}},
    }  # fmt: skip
    status, answer = await client.post("/prompt", json={"prompt": prompt})
    assert status == 400
    types = {e["type"] for e in answer["node_errors"]["1"]["errors"]}
    assert types == {"value_smaller_than_min", "value_bigger_than_max", "invalid_input_type"}
    assert answer["node_errors"]["1"]["dependent_outputs"] == ["3"]
    assert "2" not in answer["node_errors"]  # invalid only because of node 1
    prompt["1"] = {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
    }
    _, answer = await client.post("/prompt", json={"prompt": prompt})
    assert answer["node_errors"]["2"]["errors"][0]["type"] == "return_type_mismatch"


async def test_long_combo_reports_null_input_config(tmp_path: Path):
    """A combo of more than 20 options reports `(list of length N)` and input_config null."""
    names = [f"m{i}.safetensors" for i in range(25)]
    async with (
        ComfyEmulator(Faults(), tmp_path, checkpoints=names) as comfy,
        aiohttp.ClientSession() as s,
    ):
        prompt = img2img("x.png", ckpt="nope.safetensors")
        async with s.post(f"{comfy.url}/prompt", json={"prompt": prompt}) as response:
            answer = await response.json()
    error = answer["node_errors"]["2"]["errors"][0]
    assert error["details"] == "ckpt_name: 'nope.safetensors' not in (list of length 25)"
    assert error["extra_info"]["input_config"] is None


async def test_one_invalid_output_of_two_still_queues_with_node_errors(connect):
    """200 with non-empty node_errors when only some outputs fail validation."""
    client = await connect()
    image = await client.upload()
    prompt = invert(image)
    prompt["4"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}
    status, answer = await client.post("/prompt", json={"prompt": prompt, "client_id": client.cid})
    assert status == 200
    assert answer["node_errors"]["4"]["errors"][0]["type"] == "required_input_missing"
    await client.wait_done(answer["prompt_id"])
    history = await client.history(answer["prompt_id"])
    assert list(history[answer["prompt_id"]]["outputs"]) == ["3"]


async def test_queue_delete_unknown_and_clear(connect):
    """/queue delete of an unknown id and clear answer 200 with an empty body."""
    client = await connect()
    assert await client.post("/queue", json={"delete": ["nope"]}) == (200, "")
    assert await client.post("/queue", json={"clear": True}) == (200, "")
    assert await client.post("/interrupt") == (200, "")
    assert client.trace.items[-1]["content_type"] == ""


async def test_history_max_items_offset_and_delete(connect):
    """/history?max_items=N gives the N most recent; POST /history deletes and clears."""
    client = await connect()
    image = await client.upload()
    pids = []
    for prefix in ("t/a", "t/b", "t/c"):
        pids.append(await client.submit(invert(image, prefix)))
        await client.wait_done(pids[-1])
    assert list((await client.get("/history?max_items=2"))[1]) == pids[1:]
    assert list((await client.get("/history?max_items=1&offset=0"))[1]) == pids[:1]
    await client.post("/history", json={"delete": [pids[0]]})
    assert list((await client.get("/history"))[1]) == pids[1:]
    await client.post("/history", json={"clear": True})
    assert (await client.get("/history"))[1] == {}


async def test_view_guards(connect):
    """/view: 400 for `..` or an unknown type, 403 for a subfolder escape, else the file."""
    client = await connect()
    await client.upload()
    assert (await client.get("/view", params={"filename": "../x.png"}))[0] == 400
    assert (await client.get("/view", params={"filename": "x.png", "type": "odd"}))[0] == 400
    assert (await client.get("/view", params={"filename": "x.png", "subfolder": "../.."}))[0] == 403
    async with client.session.get(
        f"{client.url}/view", params={"filename": "src.png", "subfolder": "trace", "type": "input"}
    ) as r:
        assert (r.status, r.content_type) == (200, "image/png")
        assert r.headers["Content-Disposition"] == 'filename="src.png"'


async def test_upload_types_and_missing_part(connect, comfy):
    """Upload to temp/, same bytes reused, other bytes renamed, no file part 400."""
    client = await connect()
    form = upload_form(png_bytes((1, 2, 3)), "a.png", None)
    form.add_field("type", "temp")
    _, answer = await client.post("/upload/image", data=form)
    assert answer == {"name": "a.png", "subfolder": "trace", "type": "temp"}
    assert (comfy.dirs.temp / "trace" / "a.png").is_file()
    form = aiohttp.FormData()
    form.add_field("image", b"", filename="", content_type="image/png")
    assert (await client.post("/upload/image", data=form))[0] == 400


async def test_object_info_lists_nodes_with_real_inputs(connect):
    """/object_info has every emulated node; required inputs carry ComfyUI's names."""
    client = await connect()
    await client.upload("top.png")
    _, info = await client.get("/object_info")
    expected = {
        "LoadImage", "SaveImage", "PreviewImage", "ImageScale", "ImageInvert", "ImageBlur",
        "ImageSharpen", "ImageQuantize", "EmptyImage", "CheckpointLoaderSimple",
        "CLIPTextEncode", "VAEEncode", "KSampler", "VAEDecode", "EmptyLatentImage",
    }  # fmt: skip
    assert expected <= set(info)
    ksampler = info["KSampler"]["input"]["required"]
    assert list(ksampler) == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                              "positive", "negative", "latent_image", "denoise"]  # fmt: skip
    assert (
        "v1-5-pruned-emaonly.safetensors"
        in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    )
    assert info["SaveImage"]["output_node"] is True
    assert info["ImageQuantize"]["input"]["required"]["dither"][0] == "COMBO"


async def test_routing_other_clients_and_no_client(connect):
    """Targeted events reach only their client; without client_id only progress is broadcast."""
    mine, other = await connect(), await connect()
    image = await mine.upload()
    start = len(mine.trace.items)
    pid = await other.submit(invert(image, "t/o"))
    assert await mine.trace.wait_for(idle_pred, start)
    assert mine.messages(pid=pid) == []
    start = len(mine.trace.items)
    _, answer = await mine.post("/prompt", json={"prompt": invert(image, "t/n")})
    assert await mine.trace.wait_for(idle_pred, start)
    seen = [m["type"] for m in mine.messages(pid=answer["prompt_id"])]
    assert seen == ["progress_state"] * 2  # nodes 1 and 2 are cached: only node 3 runs


async def test_identical_prompt_is_cached_and_replays_file_names(connect):
    """Resubmitting the same graph runs nothing and `executed` replays the old file name."""
    client = await connect()
    image = await client.upload()
    first = await client.submit(invert(image))
    await client.wait_done(first)
    second = await client.submit(invert(image))
    await client.wait_done(second)
    cached = client.messages("execution_cached", second)[0]["data"]["nodes"]
    outputs = [m["data"]["output"] for m in client.messages("executed")]
    assert cached == ["1", "2", "3"]
    assert outputs[0] == outputs[1]
    assert client.messages("executing", second)[-1]["data"]["node"] is None


async def test_img2img_order_steps_and_style(connect, comfy):
    """ComfyUI's node order, one progress per step, and a styled output that follows the text."""
    client = await connect()
    image = await client.upload()
    pid = await client.submit(img2img(image, steps=5))
    await client.wait_done(pid)
    order = [m["data"]["node"] for m in client.messages("executing", pid)][:-1]
    assert order == ["2", "1", "5", "4", "3", "6", "7", "8"]
    assert [m["data"]["value"] for m in client.messages("progress", pid)] == [1, 2, 3, 4, 5]
    other = await client.submit(img2img(image, steps=5, text="an oil painting"))
    await client.wait_done(other)
    first, second = await _output_pixels(client, pid), await _output_pixels(client, other)
    with Image.open(comfy.dirs.input / "trace" / "src.png") as src:
        source = src.convert("RGB").getpixel((0, 0))
    assert len({first, second, source}) == 3


async def _output_pixels(client, pid: str) -> tuple[int, ...]:
    image = (await client.history(pid))[pid]["outputs"]["8"]["images"][0]
    async with client.session.get(f"{client.url}/view", params=image) as response:
        data = await response.read()
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))


async def test_foreign_origin_on_loopback_is_forbidden(comfy):
    """A browser Origin that differs from a loopback Host gets ComfyUI's empty 403."""
    async with aiohttp.ClientSession() as session:
        headers = {"Origin": "http://evil.example"}
        async with session.get(f"{comfy.url}/prompt", headers=headers) as response:
            assert (response.status, await response.text()) == (403, "")
        headers = {"Origin": comfy.url}
        async with session.get(f"{comfy.url}/prompt", headers=headers) as response:
            assert response.status == 200
