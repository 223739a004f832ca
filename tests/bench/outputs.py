"""Time `save()` of both output stores: `python -m tests.bench.outputs`.

A 1024x1024 PNG of about 1.3 MB (a typical ComfyUI output) is saved N times to the local
store (a temp directory) and to the S3 store (moto's server in a thread on loopback, so
its CPU shares this process: the S3 figure is pessimistic). Prints median and p90 in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from urllib.request import Request, urlopen

from moto.server import ThreadedMotoServer
from PIL import Image

from consumer.object_store import S3OutputConfig, S3OutputStore
from consumer.storage import LocalOutputStore, OutputStore

WARMUP = 3


def output_png(side: int = 1024) -> bytes:
    """Noise in every other band of rows over a flat colour: about 1.3 MB at 1024 px."""
    noise = Image.effect_noise((side, side), 90).convert("RGB")
    flat = Image.new("RGB", (side, side), (120, 80, 200))
    mask = Image.linear_gradient("L").resize((side, side)).point(lambda v: 255 * (v % 16 < 8))
    buffer = io.BytesIO()
    Image.composite(noise, flat, mask).save(buffer, "PNG")
    return buffer.getvalue()


async def time_saves(store: OutputStore, data: bytes, runs: int) -> str:
    samples = []
    for i in range(WARMUP + runs):
        start = time.perf_counter()
        await store.save("bench", f"styled_{i:05}_.png", data, "image/png")
        samples.append((time.perf_counter() - start) * 1000)
    kept = sorted(samples[WARMUP:])
    p90 = kept[max(0, int(len(kept) * 0.9) - 1)]
    return f"median {statistics.median(kept):.2f} ms, p90 {p90:.2f} ms"


async def bench(runs: int) -> None:
    data = output_png()
    _say(f"PNG {len(data)} bytes, {runs} saves each")
    with tempfile.TemporaryDirectory() as root:
        _say(f"local : {await time_saves(LocalOutputStore(Path(root), 'http://x'), data, runs)}")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint, bucket = f"http://{host}:{port}", f"bench-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(lambda: urlopen(Request(f"{endpoint}/{bucket}", method="PUT")))  # noqa: S310
        config = S3OutputConfig(
            bucket, endpoint_url=endpoint, force_path_style=True, access_key_id="a",
            secret_access_key="b",
        )  # fmt: skip
        async with S3OutputStore(config) as store:
            _say(f"s3    : {await time_saves(store, data, runs)} (presigned URL)")
    finally:
        server.stop()


def _say(line: str) -> None:
    print(line)  # noqa: T201 - a benchmark reports on stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    asyncio.run(bench(parser.parse_args().runs))


if __name__ == "__main__":
    main()
