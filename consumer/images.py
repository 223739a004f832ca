"""Turn a downloaded photo into the PNG we upload to ComfyUI.

`normalise()` is pure and synchronous (callers run it in a thread). It accepts JPEG
(and its multi-picture variant MPO), PNG, WebP and HEIC/HEIF, refuses decompression bombs
from the header before decoding, applies the EXIF orientation, flattens alpha onto white,
and scales so the long side is at most `max_side` with both sides multiples of 8 (what
Stable Diffusion's VAE needs).

`probe()` reads only the header: it refuses what `normalise()` would refuse before decoding,
and estimates the memory the decode will take, so that callers can wait for that much of a
`DecodeBudget` first. Memory (`python -m tests.bench.decode_memory`):

* a JPEG decodes at a reduced DCT scale, so it may have `max_pixels`; PNG, WebP and HEIC
  decode at full size and get the lower `max_pixels_full_decode`;
* the estimate counts Pillow's copy (RGB takes 4 bytes a pixel), what the format's decoder
  holds beside it, the upright and RGB copies, and the scaling; see `_estimate_bytes`.

Speed (budget: 30 ms of one core for a 12 MP phone JPEG; `python -m tests.bench.images`):

* a JPEG is decoded at a reduced DCT scale (`Image.draft`), never at full size;
* an image that already fits `max_side` is cropped (at most 7 px per side, centred) to
  multiples of 8 rather than resampled: a 4032x3024 photo decodes at 1/4 to 1008x756 and
  comes out 1008x752 without any resampling pass;
* the PNG is written by `encode_png`, stored (level 0) by default: it crosses a LAN once.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import (
    ExifTags,
    Image,
    ImageChops,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    UnidentifiedImageError,
)

from consumer.errors import ImageInvalid, ImageTooLarge
from consumer.fetch import ImageFetcher

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "ACCEPTED_FORMATS",
    "ImageFetcher",
    "NormalisedImage",
    "Probe",
    "encode_png",
    "normalise",
    "probe",
    "release_freed_memory",
    "target_size",
]

# The JPEG opener also yields multi-picture JPEGs (format "MPO", common from phones).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_PIXELS_FULL_DECODE = 30_000_000
_REDUCED_DECODE_FORMATS = frozenset({"JPEG", "MPO"})
SIDE_MULTIPLE = 8
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_RGB = 2
_PNG_FILTER_NONE = b"\x00"
_PNG_FILTER_UP = b"\x02"
# A JPEG may decode at a DCT scale a little under the target size: 1/4 of a 4032 px side is
# 1008 px for a 1024 px target, kept as is rather than decoded at 1/2 and resampled.
DRAFT_MIN_FRACTION = 0.9
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TURNING_ORIENTATIONS = frozenset(range(2, 9))
# Memory per decoded pixel, measured with `python -m tests.bench.decode_memory --calibrate`.
_RGB_BYTES = 4  # Pillow pads RGB to 4 bytes a pixel
_ALPHA_BYTES = 1
_OUTPUT_BYTES = 16  # per output pixel: the scaled image, its raw bytes, the PNG rows, the PNG
_DCT_COEFFICIENT_BYTES = 2
# Held only while decoding: libwebp's frame copied into a bytes object, libheif's RGB(A) planes.
_DECODING_BYTES = {"WEBP": 4, "HEIF": 4}
# Held as long as the image lives: libwebp's animation decoder keeps two RGBA canvases.
_RESIDENT_BYTES = {"WEBP": 8}
_WHITE = (255, 255, 255)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_SIGNATURES = (
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
)


@dataclass(frozen=True, slots=True)
class NormalisedImage:
    """The upright RGB image as PNG, its size, and the format it arrived in."""

    png: bytes
    width: int
    height: int
    source_format: str


@dataclass(frozen=True, slots=True)
class Probe:
    """What the header says: the stored size, the format, and the bytes decoding will take."""

    width: int
    height: int
    format: str
    estimated_decode_bytes: int


@dataclass(frozen=True, slots=True)
class _Plan:
    """How the image will be decoded, decided from its header."""

    stored_pixels: int  # as stored, before any DCT scaling
    orientation: int
    target: tuple[int, int]  # the upright output size


def probe(
    data: bytes,
    max_side: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_pixels_full_decode: int = DEFAULT_MAX_PIXELS_FULL_DECODE,
) -> Probe:
    """Read the header only; raises ImageInvalid or ImageTooLarge as `normalise` would."""
    _check_max_side(max_side)
    with _refusals(data), _open(data) as image:
        width, height = image.size
        plan = _plan(image, max_side, _pixel_limit(image, max_pixels, max_pixels_full_decode))
        return Probe(width, height, image.format or "unknown", _estimate_bytes(image, plan))


def normalise(
    data: bytes,
    max_side: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    png_compress_level: int = 0,
    *,
    max_pixels_full_decode: int = DEFAULT_MAX_PIXELS_FULL_DECODE,
) -> NormalisedImage:
    """Decode, orient, flatten and scale `data`; raises ImageInvalid or ImageTooLarge."""
    _check_max_side(max_side)
    with _refusals(data), _open(data) as image:
        limit = _pixel_limit(image, max_pixels, max_pixels_full_decode)
        return _normalise_open(image, max_side, limit, png_compress_level)


def release_freed_memory() -> None:
    """Hand the memory a finished decode freed back to the operating system.

    glibc keeps freed blocks in the arena of the thread that freed them, and decodes run on
    several worker threads: without this, RSS creeps past any decode budget (each thread
    keeps its own largest decode) and stays there. A no-op without glibc's `malloc_trim`.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return trim


def _check_max_side(max_side: int) -> None:
    if max_side < SIDE_MULTIPLE:
        raise ValueError(f"max_side must be at least {SIDE_MULTIPLE}, got {max_side}")


@contextmanager
def _refusals(data: bytes) -> Iterator[None]:
    """Pillow's bomb guard and decoder errors, raised as ImageTooLarge and ImageInvalid."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageInvalid(
            f"the image ({len(data)} bytes) is truncated or corrupt: {type(exc).__name__}: {exc}"
        ) from exc


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Both sides scaled to fit `max_side`, each rounded to a multiple of 8 (at least 8)."""
    scale = min(1.0, max_side / max(width, height))
    limit = max(SIDE_MULTIPLE, max_side // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return _multiple_of_8(width * scale, limit), _multiple_of_8(height * scale, limit)


def _multiple_of_8(side: float, limit: int) -> int:
    return min(limit, max(1, round(side / SIDE_MULTIPLE)) * SIDE_MULTIPLE)


@functools.cache
def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF, once per process, on first use (the import is slow)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def _open(data: bytes) -> ImageFile.ImageFile:
    _register_heif()
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageInvalid(
            f"not a JPEG, PNG, WebP or HEIC image: received {_describe(data)}"
        ) from exc


def _describe(data: bytes) -> str:
    """What a non-image body looks like, for the error message."""
    if not data:
        return "an empty body"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return f"{name} ({len(data)} bytes)"
    head = data[:32]
    if head.lstrip()[:1] in {b"<", b"{", b"["}:
        return f"text ({len(data)} bytes) starting {head.decode('utf-8', 'replace')!r}"
    return f"{len(data)} bytes starting {head!r}"


def _normalise_open(
    image: ImageFile.ImageFile, max_side: int, max_pixels: int, png_compress_level: int
) -> NormalisedImage:
    source_format = image.format or "unknown"
    _plan(image, max_side, max_pixels)
    ImageOps.exif_transpose(image, in_place=True)  # decodes, at the scale the plan set
    scaled = _fit(_to_rgb(image), max_side)
    png = encode_png(scaled, png_compress_level)
    return NormalisedImage(png, scaled.width, scaled.height, source_format)


def _plan(image: ImageFile.ImageFile, max_side: int, max_pixels: int) -> _Plan:
    """Check the pixel limit and set a JPEG's DCT scale: header work, no pixel decoded.

    The scale is the smallest one near the upright target size (`DRAFT_MIN_FRACTION`).
    """
    _check_pixels(image, max_pixels)
    stored_pixels = image.width * image.height
    orientation = _orientation(image)
    swapped = orientation in _SWAPPING_ORIENTATIONS
    width, height = (image.height, image.width) if swapped else image.size
    target = target_size(width, height, max_side)
    stored_target = (target[1], target[0]) if swapped else target
    request = [math.ceil(side * DRAFT_MIN_FRACTION) for side in stored_target]
    image.draft("RGB", (request[0], request[1]))
    return _Plan(stored_pixels, orientation, target)


def _pixel_limit(image: Image.Image, max_pixels: int, max_pixels_full_decode: int) -> int:
    """A JPEG decodes at a reduced scale; the other formats at full size, so lower."""
    if image.format in _REDUCED_DECODE_FORMATS:
        return max_pixels
    return min(max_pixels, max_pixels_full_decode)


def _estimate_bytes(image: ImageFile.ImageFile, plan: _Plan) -> int:
    """The most memory the decode will hold at once, from the header and the plan.

    Call after `_plan`: a JPEG's size is then the reduced one its decoder will produce.
    Pillow's image and what the decoder keeps beside it, plus the largest of: decoding,
    turning upright (a second copy), converting to RGB; plus the scaling and the PNG.
    """
    pixels = image.width * image.height
    resident = pixels * (_pixel_bytes(image.mode) + _RESIDENT_BYTES.get(image.format or "", 0))
    decoding = pixels * _DECODING_BYTES.get(image.format or "", 0) + _coefficient_bytes(
        image, plan.stored_pixels
    )
    turning = pixels * _pixel_bytes(image.mode) if plan.orientation in _TURNING_ORIENTATIONS else 0
    converting = pixels * _conversion_bytes(image)
    return resident + max(decoding, turning, converting) + _scaling_bytes(image, plan.target)


def _pixel_bytes(mode: str) -> int:
    """Bytes a pixel takes in Pillow's memory: 1 for 1/L/P, 2 for I;16, else 4."""
    if mode in {"1", "L", "P"}:
        return 1
    return 2 if mode.startswith("I;16") else 4


def _conversion_bytes(image: Image.Image) -> int:
    """Per pixel, what `_to_rgb` allocates beside the decoded image."""
    if image.mode == "RGB":
        return 0
    if not image.has_transparency_data:
        return _RGB_BYTES
    rgba = 0 if image.mode == "RGBA" else _RGB_BYTES
    return rgba + _RGB_BYTES + _ALPHA_BYTES


def _coefficient_bytes(image: Image.Image, stored_pixels: int) -> int:
    """A progressive JPEG keeps every DCT coefficient of the full image, whatever the scale."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile) or not image.info.get("progressive"):
        return 0
    most = max(h for _, h, _, _ in image.layer) * max(v for _, _, v, _ in image.layer)
    samples = sum(h * v for _, h, v, _ in image.layer) / most  # per pixel: subsampled chroma
    return math.ceil(stored_pixels * samples * _DCT_COEFFICIENT_BYTES)


def _scaling_bytes(image: Image.Image, target: tuple[int, int]) -> int:
    """Resampling's intermediate pass (target side by source side) and the output's copies."""
    return _RGB_BYTES * max(image.size) * max(target) + _OUTPUT_BYTES * target[0] * target[1]


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """Scale down to `max_side`; an image that already fits loses at most 7 px per side."""
    if max(image.size) > max_side or min(image.size) < SIDE_MULTIPLE:
        return image.resize(target_size(*image.size, max_side), Image.Resampling.BICUBIC)
    width, height = (side // SIDE_MULTIPLE * SIDE_MULTIPLE for side in image.size)
    if (width, height) == image.size:
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Refuse from the header alone, before any pixel is decoded."""
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageTooLarge(
            f"the image is {image.width}x{image.height} = {pixels} pixels,"
            f" over the limit of {max_pixels} for {image.format or 'its format'}"
        )


def _orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if isinstance(orientation, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if not image.has_transparency_data:
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # no copy of an RGBA
    flat = Image.new("RGB", rgba.size, _WHITE)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def encode_png(image: Image.Image, compress_level: int = 0) -> bytes:
    """An 8-bit RGB PNG of `image` (which must be RGB), without metadata.

    Not Pillow's PNG encoder: it tries all five row filters on every row, which alone costs
    more than decoding a 12 MP JPEG at reduced scale. Level 0 writes stored (uncompressed)
    deflate blocks, the fastest valid PNG; levels 1-9 use the Up filter (one C pass via
    ImageChops) and zlib at that level.
    """
    width, height = image.size
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_RGB, 0, 0, 0)
    if compress_level == 0:
        rows = _png_rows(image, _PNG_FILTER_NONE)
    else:
        rows = _png_rows(_up_filtered(image), _PNG_FILTER_UP)
    idat = zlib.compress(rows, compress_level)
    return b"".join(
        (_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _PNG_IEND)
    )


def _up_filtered(image: Image.Image) -> Image.Image:
    """Each row minus the row above, modulo 256 (PNG's Up filter)."""
    above = Image.new("RGB", image.size)
    above.paste(image.crop((0, 0, image.width, image.height - 1)), (0, 1))
    return ImageChops.subtract_modulo(image, above)


def _png_rows(image: Image.Image, filter_type: bytes) -> bytes:
    raw = image.tobytes()
    stride = image.width * 3
    return b"".join(
        filter_type + raw[start : start + stride] for start in range(0, len(raw), stride)
    )


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


_PNG_IEND = _png_chunk(b"IEND", b"")
