"""Time `normalise()` on a synthetic 12 MP phone-like JPEG: `python -m tests.bench.images`.

Prints the median CPU time of one core (`time.process_time`) over N runs, and the PNG
encode share of it, so budget regressions show up as numbers rather than feelings.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

from PIL import Image

from consumer import images

PHONE_SIZE = (4032, 3024)


def phone_photo(size: tuple[int, int] = PHONE_SIZE) -> Image.Image:
    """Smooth colour blobs, a gradient and light sensor grain: a photo's entropy, roughly."""
    width, height = size
    blobs = Image.effect_noise((width // 16, height // 16), 60).resize(
        size, Image.Resampling.BICUBIC
    )
    gradient = Image.linear_gradient("L").resize(size)
    grain = Image.effect_noise(size, 8)
    channels = (blobs, gradient, Image.blend(blobs, gradient, 0.5))
    return Image.merge("RGB", [Image.blend(c, grain, 0.15) for c in channels])


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def median_cpu_ms(action: Callable[[], object], runs: int) -> float:
    """The median process CPU time of `action`, in milliseconds."""
    samples = []
    for _ in range(runs):
        start = time.process_time()
        action()
        samples.append((time.process_time() - start) * 1000)
    return statistics.median(samples)


def _say(line: str) -> None:
    print(line)  # noqa: T201 - a benchmark reports on stdout


def _pillow_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def bench_normalise(data: bytes, max_side: int, level: int, runs: int) -> images.NormalisedImage:
    """Print the median CPU time of normalise() at one PNG level; returns its result."""
    result = images.normalise(data, max_side, png_compress_level=level)  # also warms up

    def once() -> object:
        return images.normalise(data, max_side, png_compress_level=level)

    _say(
        f"normalise (png_compress_level={level}): median {median_cpu_ms(once, runs):.1f} ms"
        f" CPU of one core -> {result.width}x{result.height}, {len(result.png)} PNG bytes"
    )
    return result


def bench_encoders(upright: Image.Image, runs: int) -> None:
    """Print the PNG encode time and size of each encoder on the normalised image."""
    encoders: dict[str, Callable[[], bytes]] = {
        "encode_png level 0": lambda: images.encode_png(upright, 0),
        "encode_png level 1": lambda: images.encode_png(upright, 1),
        "Pillow PNG level 1 (reference)": lambda: _pillow_png(upright),
    }
    for name, encode in encoders.items():
        _say(f"{name}: median {median_cpu_ms(encode, runs):.1f} ms, {len(encode())} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args()
    data = jpeg_bytes(phone_photo())
    _say(f"input: {PHONE_SIZE[0]}x{PHONE_SIZE[1]} JPEG, {len(data)} bytes, {args.runs} runs")
    bench_normalise(data, args.max_side, 1, args.runs)
    result = bench_normalise(data, args.max_side, 0, args.runs)
    bench_encoders(Image.open(io.BytesIO(result.png)).convert("RGB"), args.runs)


if __name__ == "__main__":
    main()
