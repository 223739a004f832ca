"""Turn a downloaded photo into the PNG we upload to ComfyUI.

`normalise()` is pure and synchronous (callers run it in a thread). It accepts JPEG
(and its multi-picture variant MPO), PNG, WebP and HEIC/HEIF, refuses decompression bombs
from the header before decoding, applies the EXIF orientation, flattens alpha onto white,
and scales so the long side is at most `max_side` with both sides multiples of 8 (what
Stable Diffusion's VAE needs).

Speed (budget: 30 ms of one core for a 12 MP phone JPEG; `python -m tests.bench.images`):

* a JPEG is decoded at a reduced DCT scale (`Image.draft`), never at full size;
* an image that already fits `max_side` is cropped (at most 7 px per side, centred) to
  multiples of 8 rather than resampled: a 4032x3024 photo decodes at 1/4 to 1008x756 and
  comes out 1008x752 without any resampling pass;
* the PNG is written by `encode_png`, stored (level 0) by default: it crosses a LAN once.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageChops, ImageFile, ImageOps, UnidentifiedImageError

from consumer.errors import ImageInvalid, ImageTooLarge
from consumer.fetch import ImageFetcher

__all__ = [
    "ACCEPTED_FORMATS",
    "ImageFetcher",
    "NormalisedImage",
    "encode_png",
    "normalise",
    "target_size",
]

# The JPEG opener also yields multi-picture JPEGs (format "MPO", common from phones).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
DEFAULT_MAX_PIXELS = 50_000_000
SIDE_MULTIPLE = 8
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_RGB = 2
_PNG_FILTER_NONE = b"\x00"
_PNG_FILTER_UP = b"\x02"
# A JPEG may decode at a DCT scale a little under the target size: 1/4 of a 4032 px side is
# 1008 px for a 1024 px target, kept as is rather than decoded at 1/2 and resampled.
DRAFT_MIN_FRACTION = 0.9
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
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


def normalise(
    data: bytes,
    max_side: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    png_compress_level: int = 0,
) -> NormalisedImage:
    """Decode, orient, flatten and scale `data`; raises ImageInvalid or ImageTooLarge."""
    if max_side < SIDE_MULTIPLE:
        raise ValueError(f"max_side must be at least {SIDE_MULTIPLE}, got {max_side}")
    try:
        with _open(data) as image:
            return _normalise_open(image, max_side, max_pixels, png_compress_level)
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
    _check_pixels(image, max_pixels)
    swapped = _orientation(image) in _SWAPPING_ORIENTATIONS
    width, height = (image.height, image.width) if swapped else image.size
    target = target_size(width, height, max_side)
    _decode_upright(image, (target[1], target[0]) if swapped else target)
    scaled = _fit(_to_rgb(image), max_side)
    png = encode_png(scaled, png_compress_level)
    return NormalisedImage(png, scaled.width, scaled.height, source_format)


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
            f" over the limit of {max_pixels}"
        )


def _orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if isinstance(orientation, int) else 1


def _decode_upright(image: ImageFile.ImageFile, stored_target: tuple[int, int]) -> None:
    """Decode (a JPEG at the smallest DCT scale near `stored_target`), then orient."""
    request = tuple(math.ceil(side * DRAFT_MIN_FRACTION) for side in stored_target)
    image.draft("RGB", (request[0], request[1]))
    ImageOps.exif_transpose(image, in_place=True)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if not image.has_transparency_data:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
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
