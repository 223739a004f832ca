"""Benchmark of the ComfyUI client on the emulator with zero-time steps.

    python -m tests.bench.comfyui [--prompts 200] [--concurrency 8]

Prints (1) per-prompt latency of submit -> wait (POST /prompt, WS events, GET /history),
one prompt at a time, p50/p99 in ms: with zero-time steps this is the client's overhead
plus the emulator's own bookkeeping; and (2) prompts/s through one instance with
`--concurrency` prompts in flight over the one WebSocket.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from consumer.comfy import ClientTimeouts, ComfyClient
from consumer.testing.comfyui_emulator import ComfyEmulator
from tests.comfy.helpers import first_checkpoint, png_bytes, sampler_prompt


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values_ms: list[float]) -> str:
    p50, p99 = percentile(values_ms, 0.5), percentile(values_ms, 0.99)
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, mean {statistics.fmean(values_ms):.2f} ms"


async def one(client: ComfyClient, image: str, checkpoint: str) -> tuple[float, str]:
    prompt = sampler_prompt(image, checkpoint)
    started = time.perf_counter()
    run = await client.submit(prompt)
    await run.wait()
    return time.perf_counter() - started, run.prompt_id


async def server_ms(client: ComfyClient, prompt_id: str) -> float:
    """execution_start -> execution_success on the server (ms timestamps from /history)."""
    entry = (await client._http.get_json(f"/history/{prompt_id}"))[prompt_id]
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return float(stamps["execution_success"] - stamps["execution_start"])


async def sequential(
    client: ComfyClient, image: str, checkpoint: str, count: int
) -> tuple[list[float], list[float]]:
    """Round trips and, per prompt, round trip minus the server's own execution time (ms)."""
    totals_ms, overheads_ms = [], []
    for _ in range(count):
        seconds, prompt_id = await one(client, image, checkpoint)
        totals_ms.append(seconds * 1000)
        overheads_ms.append(seconds * 1000 - await server_ms(client, prompt_id))
    return totals_ms, overheads_ms


async def throughput(
    client: ComfyClient, image: str, checkpoint: str, count: int, concurrency: int
) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def limited() -> None:
        async with gate:
            await one(client, image, checkpoint)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(limited())
    return count / (time.perf_counter() - started)


async def main(prompts: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with (
            ComfyEmulator(output_dir=Path(folder)) as emulator,
            ComfyClient(emulator.url, timeouts=ClientTimeouts()) as client,
        ):
            image = await client.upload_image(png_bytes(64), "bench.png")
            checkpoint = await first_checkpoint(client)
            await sequential(client, image, checkpoint, 10)  # warm-up
            totals_ms, overheads_ms = await sequential(client, image, checkpoint, prompts)
            rate = await throughput(client, image, checkpoint, prompts, concurrency)
    report = (
        f"prompts: {prompts} (8-node img2img graph, 4 zero-time sampler steps)\n"
        f"submit->outputs round trip, one at a time: {summary(totals_ms)}\n"
        f"  minus server execution (start->success): {summary(overheads_ms)}\n"
        f"throughput, {concurrency} in flight on one instance: {rate:.1f} prompts/s"
    )
    print(report)  # noqa: T201 - a benchmark's job is to print its numbers


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.prompts, args.concurrency))
