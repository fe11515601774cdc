"""Validate one image's bytes: decode it completely, normalise it the way ``open_rgb`` will, or say why not.

``check_image(data, limits)`` returns an ``ImageCheck``: either the image's facts (content id, upright size,
format, original mode, frame count, a 64-bit difference hash for near-duplicate search, the file extension
to store it under) or a reason code with a detail a person can act on. Reason codes:

==================== ===========================================================================
``image_empty``      zero bytes
``image_too_large``  more bytes than ``max_bytes``, or more pixels than ``max_pixels`` (bomb guard)
``image_not_image``  not an image at all (HTML, JSON, text...), judged from the content, never the name
``image_unsupported`` an image format outside ``formats`` (e.g. PSD, ICO)
``image_truncated``  the compressed data ends early
``image_corrupt``    the data does not decode (broken stream, bad header values)
``image_too_small``  a side shorter than ``min_side`` (e.g. 1x20000 strips)
``image_bad_aspect`` longer side / shorter side above ``max_aspect_ratio``
==================== ===========================================================================

Speed: JPEGs are decoded with ``Image.draft`` (libjpeg's DCT scaling). The whole entropy-coded stream is
still read and Huffman-decoded, so truncation and stream errors surface exactly as in a full decode; only the
inverse DCT runs at 1/2..1/8 scale. Set ``fast_jpeg: false`` to decode at full size. Other formats decode at
full size. EXIF orientation is applied to the reported width/height, so they are the upright size that
``processors.imageio.open_rgb`` will return.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from builder.ids import bytes_id
from processors.imageio import DEFAULT_MAX_PIXELS, to_rgb

VALIDATE_VERSION = "1"  # bump when a change here can change a row or a verdict: part of the stage fingerprint

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_TEXT_STARTS = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"[", b"<")


class ImageLimits(BaseModel):
    """What an acceptable image is. Part of the images stage config (key ``limits``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(50 * 2**20, ge=1, description="larger files fail with image_too_large")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard, checked before decoding")
    min_side: int = Field(8, ge=1, description="shorter side below this fails with image_too_small")
    max_aspect_ratio: float = Field(30.0, ge=1.0, description="longer/shorter side above this fails")
    formats: tuple[str, ...] = Field(
        ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"), description="PIL format names accepted"
    )
    fast_jpeg: bool = Field(True, description="decode JPEG at reduced DCT scale (same error detection)")


@dataclass(frozen=True)
class ImageCheck:
    """The verdict on one image. ``reason`` is None when the image is good."""

    reason: str | None = None
    detail: str = ""
    image_id: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""
    frames: int = 1
    phash: int = 0
    ext: str = ""
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def _fail(reason: str, detail: str) -> ImageCheck:
    return ImageCheck(reason=reason, detail=detail)


def sniff_not_image(data: bytes) -> str | None:
    """A short description when the bytes are plainly text/markup rather than an image, else None."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(_TEXT_STARTS):
        kind = "an HTML page" if b"html" in head or b"<head" in head or b"<body" in head else "text/markup"
        return f"the content is {kind} ({head[:40]!r}...), probably an error page saved under an image name"
    return None


def sniff_image_magic(data: bytes) -> str | None:
    """The format a file's first bytes claim (JPEG, PNG, ...), or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_image(data: bytes, limits: ImageLimits, *, name: str = "image") -> ImageCheck:
    """Validate ``data`` (the bytes of ``name``, used in messages only)."""
    if not data:
        return _fail("image_empty", f"{name} has zero bytes; re-download or remove it")
    if len(data) > limits.max_bytes:
        return _fail("image_too_large", f"{name} has {len(data)} bytes, above limits.max_bytes={limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                check = _check_open_image(image, limits, name)
    except UnidentifiedImageError:
        magic = sniff_image_magic(data)
        if magic:
            return _fail("image_corrupt", f"{name} starts like a {magic} file but its header does not parse")
        text = sniff_not_image(data)
        return _fail("image_not_image", f"{name}: {text or 'PIL recognises no image format in it'}")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _fail("image_too_large", f"{name}: decompression-bomb guard: {exc}")
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError) as exc:
        return _decode_failure(name, exc)
    if check.ok:
        return replace(check, image_id=bytes_id(data), size=len(data))
    return check


def _decode_failure(name: str, exc: BaseException) -> ImageCheck:
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower() or isinstance(exc, EOFError):
        return _fail("image_truncated", f"{name}: the data ends early ({message}); re-download the file")
    return _fail("image_corrupt", f"{name}: cannot be decoded ({type(exc).__name__}: {message})")


def _check_open_image(image: Image.Image, limits: ImageLimits, name: str) -> ImageCheck:
    fmt = image.format or ""
    if fmt not in limits.formats:
        return _fail("image_unsupported", f"{name} is {fmt or 'an unknown format'}; accepted: {list(limits.formats)}")
    width, height = image.size
    if width * height > limits.max_pixels:
        return _fail(
            "image_too_large",
            f"{name} announces {width}x{height} pixels, above limits.max_pixels={limits.max_pixels} "
            "(decompression-bomb guard; nothing was decoded)",
        )
    orientation = _orientation(image)
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    shape = _shape_problem(width, height, limits, name)
    if shape:
        return shape
    mode = image.mode
    frames = int(getattr(image, "n_frames", 1) or 1)
    image.seek(0)
    if fmt == "JPEG" and limits.fast_jpeg:
        image.draft(image.mode, (64, 64))  # DCT-scaled decode; still reads every byte of the stream
    image.load()
    small = ImageOps.exif_transpose(image)
    rgb = to_rgb(small)  # the conversion open_rgb will do; an unconvertible mode fails here
    return ImageCheck(
        width=width,
        height=height,
        format=fmt.lower(),
        mode=mode,
        frames=frames,
        phash=dhash(rgb),
        ext=EXTENSIONS.get(fmt, fmt.lower()),
    )


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, SyntaxError, OSError):  # a broken EXIF block: treat as upright
        return 1


def _shape_problem(width: int, height: int, limits: ImageLimits, name: str) -> ImageCheck | None:
    if min(width, height) < limits.min_side:
        return _fail("image_too_small", f"{name} is {width}x{height}; limits.min_side={limits.min_side}")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        return _fail(
            "image_bad_aspect",
            f"{name} is {width}x{height} (aspect {ratio:.1f}); limits.max_aspect_ratio={limits.max_aspect_ratio}",
        )
    return None


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: near-identical pictures (re-encoded, resized) differ in a few bits."""
    grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = grey.tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
