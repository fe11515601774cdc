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

Memory: what a check holds is the decoded image and little else. Everything after the decode (orientation,
mode conversion, hash) runs on a copy of at most ``HASH_SIDE`` pixels a side, taken by nearest neighbour from
the decoded image, so a 9000x9000 RGBA PNG costs its 324 MB of pixels instead of ~1.9 GB of working copies.
``decode_cost(data, limits)`` estimates those bytes from the header alone (width x height x bytes a pixel
after any DCT scaling; a progressive JPEG's coefficient buffer; WebP's decoder buffer), before anything is
decoded: the images stage admits decodes against its ``memory_budget_mb`` with it.
"""

from __future__ import annotations

import ctypes
import io
import logging
import warnings
from dataclasses import dataclass, replace

from PIL import ExifTags, Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from builder.ids import bytes_id
from processors.imageio import DEFAULT_MAX_PIXELS, to_rgb

logger = logging.getLogger(__name__)

VALIDATE_VERSION = "2"  # bump when a change here can change a row or a verdict: part of the stage fingerprint

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
_TEXT_STARTS = (b"<!doctype", b"<html", b"<?xml", b"<head", b"<body", b"{", b"[", b"<")
# The orientation -> transpose table of ImageOps.exif_transpose, applied here to the small hash copy.
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
HASH_SIDE = 1024  # post-decode work (orientation, RGB conversion, dHash) runs on a copy at most this large
_DRAFT_SIZE = (64, 64)  # fast_jpeg: the smallest DCT scale that keeps both sides >= 64 px
_ONE_BYTE_MODES = ("1", "L", "P")  # Pillow stores these in 1 byte a pixel, I;16* in 2, every other mode in 4


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
    _prepare_decode(image, limits)
    image.load()
    turn = _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))  # as open_rgb's exif_transpose
    small = _hash_copy(image)
    rgb = to_rgb(small.transpose(turn) if turn is not None else small)  # open_rgb's conversion: bad modes fail here
    return ImageCheck(
        width=width,
        height=height,
        format=fmt.lower(),
        mode=mode,
        frames=frames,
        phash=dhash(rgb),
        ext=EXTENSIONS.get(fmt, fmt.lower()),
    )


def _prepare_decode(image: Image.Image, limits: ImageLimits) -> None:
    """First frame; JPEG at a reduced DCT scale (still reads and Huffman-decodes every byte of the stream)."""
    image.seek(0)
    if image.format == "JPEG" and limits.fast_jpeg:
        image.draft(image.mode, _DRAFT_SIZE)


def _hash_copy(image: Image.Image) -> Image.Image:
    """The decoded image itself when small, else a nearest-neighbour copy of at most HASH_SIDE a side: the rest of
    the check then never makes a full-size copy (an RGBA one costs 4 bytes a pixel per copy)."""
    width, height = image.size
    scale = HASH_SIDE / max(width, height)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.NEAREST)  # NEAREST: no premultiplied full-size copy for alpha


def pixel_bytes(mode: str) -> int:
    """Bytes Pillow holds per pixel of an image in ``mode``."""
    if mode in _ONE_BYTE_MODES:
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_cost(data: bytes, limits: ImageLimits) -> int:
    """Bytes a ``check_image`` of ``data`` will hold at its peak, estimated from the header without decoding.

    0 when the check will fail before decoding (not an image, above a limit): nothing is held then.
    """
    if not data or len(data) > limits.max_bytes:
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in limits.formats or image.width * image.height > limits.max_pixels:
                    return 0
                full_pixels = image.width * image.height
                _prepare_decode(image, limits)
                return _held_bytes(image, full_pixels)
    except Exception:  # noqa: BLE001 - a header that does not parse fails the check before any decode
        return 0


def _held_bytes(image: Image.Image, full_pixels: int) -> int:
    decoded = image.width * image.height * pixel_bytes(image.mode)
    if image.format == "JPEG" and image.info.get("progressive"):
        decoded += _coefficient_bytes(image, full_pixels)
    elif image.format == "WEBP":
        decoded *= 4  # measured: libwebp's canvas, the bytes it returns and Pillow's copy (8000x8000: ~1 GB)
    # the hash copy and the RGB conversions on it: a few images of at most HASH_SIDE x HASH_SIDE x 4 bytes
    work = min(image.width * image.height, HASH_SIDE * HASH_SIDE) * 4 * 4
    return decoded + work


def _coefficient_bytes(image: Image.Image, full_pixels: int) -> int:
    """A progressive JPEG's coefficient buffer: libjpeg keeps every 16-bit DCT coefficient of every component
    (subsampled chroma counts by its share) until the last scan, whatever the DCT scale of the output."""
    layers = getattr(image, "layer", None) or []  # (component id, h sampling, v sampling, quantisation table)
    if not layers:
        return full_pixels * len(image.getbands()) * 2
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    share = sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)
    return int(full_pixels * share * 2)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD_BYTES = 4 * 2**20


def return_freed_pixels_to_os() -> bool:
    """Make glibc serve allocations of 4 MB and more with ``mmap``, so freed pixel memory leaves the process.

    Pillow holds pixels in 16 MB blocks. By default glibc raises its mmap threshold past such a block the first
    time one is freed; later blocks then come from per-thread heaps that keep freed memory resident, so four
    workers decoding one 324 MB image at a time still end up holding ~324 MB each: the decode budget bounds
    what is in use, this makes what is resident follow it. Process-wide (a fixed threshold also stops glibc's
    adjusting it); does nothing, and returns False, where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    if not done:
        logger.debug("mallopt(M_MMAP_THRESHOLD) refused: freed pixel memory may stay resident")
    return done


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
