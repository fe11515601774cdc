"""The hostile image corpus (design.md §10): every case converted or failed with the right reason."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders.images.dedup import hamming
from processors.image_validate import HASH_SIDE, ImageLimits, check_image, decode_cost, dhash
from processors.imageio import ImageTooLargeError, open_rgb

LIMITS = ImageLimits()


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def photo(size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray((base + rng.integers(0, 30, base.shape)).clip(0, 255).astype("uint8"))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG announcing width x height pixels with almost no data: the classic decompression bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return encode(photo((300, 100)), "JPEG", exif=exif)


def palette_alpha() -> bytes:
    image = Image.new("P", (50, 40), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


GOOD = {
    "rgb_jpeg": lambda: encode(photo(), "JPEG"),
    "cmyk_jpeg": lambda: encode(photo().convert("CMYK"), "JPEG"),
    "grey16_png": lambda: encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype("uint16")), "PNG"),
    "palette_alpha_png": palette_alpha,
    "la_png": lambda: encode(Image.new("LA", (40, 40), (128, 100)), "PNG"),
    "rgba_webp": lambda: encode(Image.new("RGBA", (40, 40), (1, 2, 3, 50)), "WEBP"),
    "animated_gif": animated_gif,
    "exif_rotated": exif_rotated,
    "bmp": lambda: encode(Image.new("RGB", (20, 20)), "BMP"),
    "tiff_16bit": lambda: encode(Image.fromarray(np.full((30, 30), 40000, dtype="uint16")), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_odd_but_valid_images_pass_and_open_as_rgb(name):
    data = GOOD[name]()
    check = check_image(data, LIMITS, name=name)
    assert check.ok, check.detail
    rgb = open_rgb(data)
    assert rgb.mode == "RGB" and rgb.size == (check.width, check.height)
    assert len(check.image_id) == 32 and check.size == len(data)


def test_details_of_special_cases():
    assert check_image(animated_gif(), LIMITS).frames == 3
    rotated = check_image(exif_rotated(), LIMITS)
    assert (rotated.width, rotated.height) == (100, 300)  # upright size, as open_rgb returns it
    assert check_image(GOOD["cmyk_jpeg"](), LIMITS).mode == "CMYK"
    white = open_rgb(palette_alpha()).getpixel((0, 0))
    assert white == (255, 255, 255)  # transparent palette entry composited on white


def truncated_jpeg() -> bytes:
    data = encode(photo((640, 480)), "JPEG", quality=95)
    return data[: len(data) // 2]


BAD = {
    "zero_bytes": (lambda: b"", "image_empty"),
    "truncated_jpeg": (truncated_jpeg, "image_truncated"),
    "truncated_png": (lambda: encode(photo(), "PNG")[:3000], "image_truncated"),
    "not_an_image": (lambda: b"just some text, no pixels here" * 10, "image_not_image"),
    "html_named_jpg": (lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "image_not_image"),
    "one_by_20000": (lambda: encode(Image.new("L", (1, 20000)), "PNG"), "image_too_small"),
    "thin_strip": (lambda: encode(Image.new("RGB", (20, 2000)), "PNG"), "image_bad_aspect"),
    "bomb": (lambda: png_header_only(100_000, 100_000), "image_too_large"),
    "unsupported_ico": (lambda: encode(Image.new("RGB", (32, 32)), "ICO"), "image_unsupported"),
    "garbage_after_magic": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "image_corrupt"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_hostile_files_fail_with_their_reason(name):
    make, reason = BAD[name]
    check = check_image(make(), LIMITS, name=f"/data/{name}.jpg")
    assert check.reason == reason, check.detail
    assert f"{name}.jpg" in check.detail  # the message names the file


def test_truncation_is_caught_with_the_fast_jpeg_path_too():
    for fast in (True, False):
        assert check_image(truncated_jpeg(), ImageLimits(fast_jpeg=fast)).reason == "image_truncated"


def test_byte_limit_and_pixel_limit_before_decoding():
    data = encode(photo(), "JPEG")
    assert check_image(data, ImageLimits(max_bytes=100)).reason == "image_too_large"
    assert check_image(data, ImageLimits(max_pixels=1000)).reason == "image_too_large"
    with pytest.raises(ImageTooLargeError):
        open_rgb(data, max_pixels=1000)


def test_dhash_sees_reencoded_copies_as_near():
    image = photo((400, 300))
    a = check_image(encode(image, "JPEG", quality=95), LIMITS)
    b = check_image(encode(image.resize((200, 150)), "PNG"), LIMITS)
    other = check_image(encode(photo((400, 300)).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"), LIMITS)
    assert a.image_id != b.image_id
    assert hamming(a.phash, b.phash) <= 4 < hamming(a.phash, other.phash)
    assert dhash(Image.new("RGB", (10, 10))) == 0


def gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    grey = Image.linear_gradient("L").resize(size)
    return Image.merge(mode, [grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey, grey][: len(mode)])


PEAK_OF_ONE_CHECK = """
import resource, sys
sys.path.insert(0, {repo!r})
from processors.image_validate import ImageLimits, check_image
data = open({path!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert check_image(data, ImageLimits()).ok
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_large_rgba_png_costs_about_its_pixels_not_six_copies(tmp_path):
    # 4000x4000 RGBA: 64 MB of pixels. Checked with full-size copies (orientation, RGBA copy, white background,
    # composite, RGB) it used ~6x that; the check now works on a small copy after the decode. Measured in a fresh
    # process: peak RSS is per process.
    path = tmp_path / "big.png"
    gradient((4000, 4000), "RGBA").save(path)
    pixels = 4000 * 4000 * 4
    script = PEAK_OF_ONE_CHECK.format(repo=str(Path(__file__).resolve().parents[2]), path=str(path))
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               timeout=120).stdout)
    assert grown < 1.6 * pixels, f"peak grew by {grown / 2**20:.0f} MB for {pixels / 2**20:.0f} MB of pixels"
    assert decode_cost(path.read_bytes(), LIMITS) >= pixels


def test_decode_cost_is_read_from_the_header():
    assert decode_cost(png_header_only(3000, 2000), LIMITS) >= 3000 * 2000  # L: one byte a pixel
    assert decode_cost(png_header_only(100_000, 100_000), LIMITS) == 0  # refused before decoding: costs nothing
    assert decode_cost(b"<html>", LIMITS) == 0
    jpeg = encode(gradient((2400, 1600)), "JPEG")
    scaled = decode_cost(jpeg, LIMITS)  # DCT-scaled to 300x200
    assert scaled < 2400 * 1600 < decode_cost(jpeg, ImageLimits(fast_jpeg=False))
    progressive = encode(gradient((2400, 1600)), "JPEG", progressive=True)
    assert decode_cost(progressive, LIMITS) > scaled + 2400 * 1600  # every DCT coefficient is kept


def test_images_above_the_hash_side_keep_near_duplicates_and_orientation():
    image = photo((3 * HASH_SIDE, 2 * HASH_SIDE))
    big = check_image(encode(image, "PNG"), LIMITS)
    small = check_image(encode(image.resize((600, 400)), "JPEG", quality=90), LIMITS)
    assert (big.width, big.height) == image.size and hamming(big.phash, small.phash) <= 4
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    turned = check_image(encode(image, "JPEG", exif=exif, quality=90), ImageLimits(fast_jpeg=False))
    upright = check_image(encode(image.transpose(Image.Transpose.ROTATE_270), "PNG"), LIMITS)
    assert (turned.width, turned.height) == (2 * HASH_SIDE, 3 * HASH_SIDE)
    assert hamming(turned.phash, upright.phash) <= 4 < hamming(turned.phash, big.phash)
