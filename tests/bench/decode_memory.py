"""Peak RSS of decoding many large inputs at once: `python -m tests.bench.decode_memory`.

Builds one worst-case input per format at the largest size the settings accept: a
progressive JPEG just under IMAGE_MAX_PIXELS (progressive JPEGs keep every DCT coefficient
whatever the decode scale), and PNG, WebP and HEIC with a transparent region just under
IMAGE_MAX_PIXELS_FULL_DECODE (alpha costs the most copies). Then, in a fresh process per
run, sends `--copies` of each at once through `pipeline.normalise_within`, the pipeline's
own path (probe, decode budget, normalise in a worker thread, give freed memory back), and
prints the peak RSS (VmHWM) and the RSS once every decode has finished.

Runs: `budget` (the default settings), `no budget` (the budget as large as memory: only the
default thread pool limits how many decode at once, as before the budget existed) and `no
trim` (the budget, but freed memory is not handed back). `--calibrate` decodes each input
alone and compares the probe's estimate with the RSS the decode really added.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from consumer import images, pipeline
from consumer.decode_budget import DecodeBudget
from consumer.settings import Settings

FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
RUNS = {"budget": [], "no budget": ["--no-budget"], "no trim": ["--no-trim"]}
MIB = 1024 * 1024
UNLIMITED_BYTES = 1 << 62


def _say(line: str) -> None:
    print(line)  # noqa: T201 - a benchmark reports on stdout


def largest_size(max_pixels: int) -> tuple[int, int]:
    """The largest 4:3 size with at most `max_pixels` pixels."""
    width = math.isqrt(max_pixels * 4 // 3)
    return width, min(width * 3 // 4, max_pixels // width)


def picture(size: tuple[int, int], alpha: bool) -> Image.Image:
    """Gradients (cheap to make, small to store), the left quarter transparent if `alpha`."""
    width, height = size
    red = Image.linear_gradient("L").resize(size)
    green = Image.radial_gradient("L").resize(size)
    image = Image.merge("RGB", (red, green, red.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    if not alpha:
        return image
    mask = Image.new("L", size, 255)
    mask.paste(0, (0, 0, width // 4, height))
    image.putalpha(mask)
    return image


def encode(fmt: str, size: tuple[int, int]) -> bytes:
    """One worst-case input of `fmt` at `size`."""
    images._register_heif()
    buffer = io.BytesIO()
    if fmt == "JPEG":
        picture(size, alpha=False).save(buffer, fmt, quality=90, progressive=True)
    else:
        picture(size, alpha=True).save(buffer, fmt, **({} if fmt == "PNG" else {"quality": 80}))
    return buffer.getvalue()


def build_inputs(directory: Path, settings: Settings) -> None:
    """Write one input per format into `directory`, saying what each is."""
    for fmt in FORMATS:
        limit = settings.image_max_pixels
        if fmt != "JPEG":
            limit = min(limit, settings.image_max_pixels_full_decode)
        size = largest_size(limit)
        started = time.monotonic()
        data = encode(fmt, size)
        (directory / fmt).write_bytes(data)
        _say(
            f"input {fmt}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels,"
            f" {len(data)} bytes (made in {time.monotonic() - started:.1f} s)"
        )


def config(settings: Settings) -> pipeline.PipelineConfig:
    return pipeline.PipelineConfig(
        max_side=settings.image_max_side,
        max_pixels=settings.image_max_pixels,
        max_pixels_full_decode=settings.image_max_pixels_full_decode,
        png_level=settings.image_png_compress_level,
    )


def status_mib(key: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def _keep_freed_memory() -> None:
    """`--no-trim`: leave freed memory in glibc's arenas, as the service did before."""


async def decode_all(inputs: list[bytes], budget: DecodeBudget, settings: Settings) -> float:
    """Every input through the pipeline's path at once; returns the wall time in seconds."""
    cfg = config(settings)
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for data in inputs:
            group.create_task(pipeline.normalise_within(budget, data, cfg))
    return time.monotonic() - started


def child(args: argparse.Namespace) -> None:
    """One run in this fresh process: print a JSON line of RSS figures."""
    settings = Settings()
    images._register_heif()
    if args.no_trim:
        pipeline.release_freed_memory = _keep_freed_memory
    capacity = UNLIMITED_BYTES if args.no_budget else settings.image_decode_budget_bytes
    inputs = [(args.dir / fmt).read_bytes() for fmt in args.formats.split(",")]
    start_mib = status_mib("VmRSS")
    reset_peak()
    wall_s = asyncio.run(decode_all(inputs * args.copies, DecodeBudget(capacity), settings))
    figures = {"start": start_mib, "peak": status_mib("VmHWM"), "after": status_mib("VmRSS")}
    _say(json.dumps({**figures, "wall_s": wall_s}))


def run_child(directory: Path, formats: str, copies: int, extra: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "tests.bench.decode_memory", "--child", "--dir"]
    command += [str(directory), "--formats", formats, "--copies", str(copies), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise SystemExit(f"the run {extra} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def calibrate(directory: Path, settings: Settings) -> None:
    """Each input decoded alone: the probe's estimate against the RSS the decode added."""
    for fmt in FORMATS:
        data = (directory / fmt).read_bytes()
        found = images.probe(
            data,
            settings.image_max_side,
            settings.image_max_pixels,
            max_pixels_full_decode=settings.image_max_pixels_full_decode,
        )
        figures = run_child(directory, fmt, 1, ["--no-trim"])
        added_mib = figures["peak"] - figures["start"]
        _say(
            f"{fmt}: estimated {found.estimated_decode_bytes / MIB:.0f} MiB,"
            f" measured {added_mib:.0f} MiB over the {figures['start']:.0f} MiB before"
        )


def compare(directory: Path, copies: int, settings: Settings) -> None:
    """Every run of RUNS, each in a fresh process."""
    budget_mib = settings.image_decode_budget_bytes / MIB
    _say(f"{copies} of each of {', '.join(FORMATS)} at once; budget {budget_mib:.0f} MiB")
    for name, extra in RUNS.items():
        figures = run_child(directory, ",".join(FORMATS), copies, extra)
        _say(
            f"{name:>9}: peak RSS {figures['peak']:.0f} MiB, after {figures['after']:.0f} MiB"
            f" (started at {figures['start']:.0f} MiB), {figures['wall_s']:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=8, help="inputs of each format at once")
    parser.add_argument("--calibrate", action="store_true", help="estimate against measure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--formats", default=",".join(FORMATS), help=argparse.SUPPRESS)
    parser.add_argument("--no-budget", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    settings = Settings()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        build_inputs(directory, settings)
        if args.calibrate:
            calibrate(directory, settings)
        compare(directory, args.copies, settings)


if __name__ == "__main__":
    main()
