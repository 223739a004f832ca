"""normalise(): formats, orientation, alpha, sizes, and the ways an image can be refused."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import ExifTags, Image

from consumer.errors import ImageInvalid, ImageTooLarge
from consumer.images import encode_png, normalise, probe, target_size

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    image.load()
    return image


def photo(size=(2000, 1500)) -> Image.Image:
    """Some structure, so that JPEG and resampling have something to chew on."""
    return Image.linear_gradient("L").resize(size).convert("RGB")


def halves(size=(64, 32)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no real pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))


def webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP of a few dozen bytes whose header claims width x height."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), RED), "WEBP", lossless=True))
    header = data.index(b"VP8L") + 9  # after the chunk size and the 0x2F signature
    bits = int.from_bytes(data[header : header + 4], "little") & ~((1 << 28) - 1)
    bits |= (width - 1) | (height - 1) << 14
    data[header : header + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def jpeg_claiming(width: int, height: int, **params) -> bytes:
    """A small JPEG whose frame header (SOF) claims width x height."""
    data = bytearray(encoded(photo((64, 48)), "JPEG", **params))
    sof = data.index(b"\xff\xc2" if params.get("progressive") else b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_jpeg_is_scaled_into_max_side_with_multiples_of_8():
    """A 2000x1500 JPEG comes out RGB, long side <= 1024, both sides multiples of 8."""
    result = normalise(encoded(photo(), "JPEG", quality=90))
    image = decoded(result.png)
    assert (result.width, result.height) == image.size
    assert image.mode == "RGB"
    assert result.source_format == "JPEG"
    assert max(image.size) <= 1024
    assert image.width % 8 == 0
    assert image.height % 8 == 0
    assert image.width / image.height == pytest.approx(2000 / 1500, rel=0.02)


def test_phone_sized_jpeg_decodes_at_quarter_scale_without_resampling():
    """A 4032x3024 JPEG decodes at 1/4 scale and is cropped to 1008x752."""
    result = normalise(encoded(photo((4032, 3024)), "JPEG", quality=70))
    assert (result.width, result.height) == (1008, 752)


def test_large_png_is_resampled_to_the_target():
    """A PNG larger than max_side is scaled to exactly the target size."""
    result = normalise(encoded(photo((2048, 1536)), "PNG"), max_side=512)
    assert (result.width, result.height) == (512, 384)
    assert result.source_format == "PNG"


def test_webp_is_accepted():
    """WebP decodes like the others."""
    result = normalise(encoded(photo((320, 240)), "WEBP", quality=80))
    assert (result.width, result.height, result.source_format) == (320, 240, "WEBP")


def test_heic_is_accepted():
    """HEIC from an iPhone decodes through pillow-heif."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    try:
        data = encoded(photo((320, 240)), "HEIF", quality=80)
    except (KeyError, OSError, ValueError) as exc:  # a libheif built without an encoder
        pytest.skip(f"pillow-heif cannot encode here: {exc}")
    result = normalise(data)
    assert (result.width, result.height, result.source_format) == (320, 240, "HEIF")


@pytest.mark.parametrize(
    ("orientation", "size", "top_left", "bottom_right"),
    [
        (1, (64, 32), RED, BLUE),
        (3, (64, 32), BLUE, RED),  # rotated 180: the red half ends on the right
        (6, (32, 64), RED, BLUE),  # rotated 90 clockwise: the red half ends on top
        (8, (32, 64), BLUE, RED),  # rotated 90 counter-clockwise: the red half at the bottom
    ],
)
def test_exif_orientation_is_applied(orientation, size, top_left, bottom_right):
    """A photo stored sideways with an EXIF Orientation comes out upright, tag removed."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    result = normalise(encoded(halves(), "JPEG", quality=95, exif=exif.tobytes()))
    image = decoded(result.png)
    assert image.size == size
    assert near(image.getpixel((2, 2)), top_left)
    assert near(image.getpixel((size[0] - 3, size[1] - 3)), bottom_right)
    assert image.getexif().get(ExifTags.Base.Orientation) is None


def near(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def left_opaque(mode: str) -> bytes:
    """A 16x16 PNG: left half opaque dark red (or grey), right half fully transparent."""
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (0, 0, 8, 16))
    if mode == "P":  # a palette with a transparent entry (tRNS), as GIF-ish PNGs have
        palette = Image.new("P", (16, 16), 1)
        palette.putpalette([0, 0, 0, 200, 0, 0])
        palette.paste(0, (8, 0, 16, 16))
        return encoded(palette, "PNG", transparency=0)
    return encoded(image.convert(mode), "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_flattened_on_white(mode):
    """Transparent pixels become white, opaque ones keep their colour."""
    result = decoded(normalise(left_opaque(mode)).png)
    assert result.mode == "RGB"
    assert result.getpixel((12, 8)) == (255, 255, 255)
    assert result.getpixel((4, 8)) != (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "P"])
def test_other_modes_become_rgb(mode):
    """Greyscale, CMYK, 16-bit and palette images all come out RGB."""
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    result = decoded(normalise(encoded(photo((64, 48)).convert(mode), fmt)).png)
    assert (result.mode, result.size) == ("RGB", (64, 48))


def test_tiny_image_is_scaled_up_to_8():
    """A 3x2 image becomes 8x8, never 0."""
    result = normalise(encoded(Image.new("RGB", (3, 2)), "PNG"))
    assert (result.width, result.height) == (8, 8)


def test_small_image_is_cropped_to_multiples_of_8():
    """An image that fits max_side loses at most 7 pixels per side instead of resampling."""
    result = normalise(encoded(photo((301, 203)), "PNG"))
    assert (result.width, result.height) == (296, 200)


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((4032, 3024), 1024, (1024, 768)),
        ((3024, 4032), 1024, (768, 1024)),
        ((1023, 767), 1024, (1024, 768)),
        ((1000, 10), 1000, (1000, 8)),
        ((5, 3), 1024, (8, 8)),
        ((5000, 5000), 1020, (1016, 1016)),
        ((100_000, 1), 1024, (1024, 8)),
    ],
)
def test_target_size_is_multiples_of_8_within_max_side(size, max_side, expected):
    """Both sides are multiples of 8, at least 8, and the long side fits max_side."""
    assert target_size(size[0], size[1], max_side) == expected


def test_truncated_jpeg_is_invalid():
    """A JPEG cut in half is refused as truncated or corrupt."""
    data = encoded(photo((256, 256)), "JPEG", quality=90)
    with pytest.raises(ImageInvalid, match="truncated or corrupt"):
        normalise(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "described"),
    [
        (bytes(range(256)) * 4, "1024 bytes starting"),
        (b"<!doctype html><html>Access denied</html>", "text (41 bytes) starting '<!doctype"),
        (b"", "an empty body"),
        (b"GIF89a" + b"\0" * 20, "a GIF image"),
        (b"%PDF-1.7\n", "a PDF document"),
    ],
)
def test_non_images_are_invalid_and_named(data, described):
    """A body that is no accepted image is refused, saying what it looks like."""
    with pytest.raises(ImageInvalid, match="not a JPEG, PNG, WebP or HEIC") as caught:
        normalise(data)
    assert described in caught.value.message


def test_pixels_over_max_are_refused_from_the_header():
    """A header claiming more pixels than max_pixels is refused before decoding."""
    with pytest.raises(ImageTooLarge, match="8000x8000 = 64000000 pixels"):
        normalise(png_header_only(8000, 8000), max_pixels=50_000_000)


@pytest.mark.parametrize("side", [10_000, 40_000])
def test_decompression_bombs_are_too_large(side):
    """Pillow's own bomb warning and error both surface as ImageTooLarge."""
    with pytest.raises(ImageTooLarge, match="pixels"):
        normalise(png_header_only(side, side), max_pixels=10**10)


def test_max_side_below_8_is_a_programming_error():
    """max_side under 8 cannot give multiples of 8."""
    with pytest.raises(ValueError, match="max_side"):
        normalise(b"", max_side=4)


@pytest.mark.parametrize("level", [0, 1, 9])
def test_encode_png_round_trips_pixels(level):
    """encode_png writes a valid PNG with the exact pixels at every level."""
    image = photo((37, 23)).rotate(30)
    assert decoded(encode_png(image, level)).tobytes() == image.tobytes()


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(png_header_only(6000, 6000), "PNG"), (webp_claiming(7000, 7000), "WEBP")],
)
def test_full_decode_formats_have_a_lower_pixel_limit(data, fmt):
    """A PNG or WebP under JPEG's limit but over the full-decode one is refused from its header."""
    for read in (probe, normalise):
        with pytest.raises(ImageTooLarge, match=f"over the limit of 30000000 for {fmt}"):
            read(data)


def test_jpeg_is_held_to_max_pixels_only():
    """A 48 MP JPEG passes: it decodes at 1/8 scale, so its estimate is of the reduced size."""
    found = probe(jpeg_claiming(8000, 6000))
    assert (found.width, found.height, found.format) == (8000, 6000, "JPEG")
    assert found.estimated_decode_bytes < 8000 * 6000 // 2


def test_progressive_jpeg_counts_its_full_size_coefficients():
    """A progressive JPEG keeps every DCT coefficient at full size: 2 bytes a sample, 4:2:0."""
    baseline = probe(jpeg_claiming(8000, 6000)).estimated_decode_bytes
    progressive = probe(jpeg_claiming(8000, 6000, progressive=True)).estimated_decode_bytes
    assert progressive - baseline == pytest.approx(8000 * 6000 * 1.5 * 2, rel=0.05)


def left_opaque_sized(mode: str, size: tuple[int, int]) -> bytes:
    """Left half opaque red, right half transparent."""
    image = Image.new(mode, size, (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (0, 0, size[0] // 2, size[1]))
    return encoded(image, "PNG")


def test_estimate_counts_pillow_copy_and_alpha_flattening():
    """A full-size RGB decode costs 4 bytes a pixel; flattening transparency costs more."""
    opaque = probe(encoded(photo((2000, 1500)), "PNG")).estimated_decode_bytes
    clear = probe(left_opaque_sized("RGBA", (2000, 1500))).estimated_decode_bytes
    assert opaque >= 2000 * 1500 * 4
    assert clear >= opaque + 2000 * 1500 * 5


def test_probe_reads_the_header_of_a_photo():
    """probe gives the stored size and the format, as normalise names it."""
    found = probe(encoded(photo((320, 240)), "WEBP", quality=80))
    assert (found.width, found.height, found.format) == (320, 240, "WEBP")


@pytest.mark.parametrize("data", [b"", b"%PDF-1.7\n", png_header_only(10_000, 10_000)])
def test_probe_refuses_what_normalise_refuses(data):
    """Non-images and bombs fail in probe with the same error as in normalise."""
    with pytest.raises((ImageInvalid, ImageTooLarge)) as by_probe:
        probe(data, max_pixels_full_decode=10**10, max_pixels=10**10)
    with pytest.raises(type(by_probe.value)) as by_normalise:
        normalise(data, max_pixels_full_decode=10**10, max_pixels=10**10)
    assert by_probe.value.message == by_normalise.value.message
