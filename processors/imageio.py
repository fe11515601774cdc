"""Opening an image the one way every step uses: first frame, EXIF orientation applied, RGB, bounded size.

CLIP matching, the GPT-4o data URLs and the referees all read images through ``open_rgb`` so that they see
exactly the same pixels the images stage validated (``processors.image_validate`` decodes through the same
``to_rgb`` and the same pixel limit). A row of the images stage holds a *path* relative to an image root;
turn it into a file with ``loaders.images.paths.resolve_image_path(run_dir, row["path"])`` first.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from loaders.images.paths import NotRegularFileError, open_regular_file  # noqa: F401 - NotRegularFileError re-exported

# Decompression-bomb guard: PIL warns above MAX_IMAGE_PIXELS and raises above twice that. We raise at the
# limit itself, so a hostile file is a failure row instead of a 20 GB allocation.
DEFAULT_MAX_PIXELS = 89_478_485

_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageTooLargeError(ValueError):
    pass


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (CMYK, 16-bit, float, palette with alpha, LA, ...) to RGB; alpha composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:
        image = _wide_grey_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # An RGBA image is composited as it is: convert("RGBA") would only copy it (4 bytes a pixel more).
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        composed = Image.alpha_composite(background, rgba)
        del background, rgba  # freed before the RGB copy is made: the peak is three images, not four
        return composed.convert("RGB")
    return image.convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit or float greyscale: stretch the used range to 8 bits instead of clipping everything at 255."""
    low, high = image.getextrema()
    if image.mode == "F" or low < 0:
        span = (high - low) or 1.0
        return image.convert("F").point(lambda v: (v - low) * (255.0 / span)).convert("L")
    scale = 255.0 / max(1, high) if high > 255 else 1.0
    return image.point(lambda v: v * scale).convert("L")


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` pixels, before anything is decoded."""
    if image.width * image.height > max_pixels:
        raise ImageTooLargeError(f"{image.width}x{image.height} exceeds the {max_pixels}-pixel limit")


def open_rgb(
    path: str | Path | bytes | BinaryIO,
    *,
    max_side: int | None = None,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode an image fully and return it as RGB (first frame, upright), optionally downscaled.

    ``max_side`` bounds the longest side (thumbnails, data URLs). ``min_side`` lets a JPEG decode at the
    smallest DCT scale (1/2, 1/4, 1/8) whose *both* sides still reach ``min_side``, with no resize after it:
    what a model that resizes the short side to ``min_side`` needs, at a fraction of the decode cost (the
    pixels differ slightly from a full decode followed by a resize). ``path`` may also be the image's bytes
    or an open binary file. Raises ``ImageTooLargeError`` above ``max_pixels``, ``NotRegularFileError`` (an
    ``OSError``) for a path that is a FIFO, socket, device or folder, and PIL's own errors
    (``UnidentifiedImageError``, ``OSError`` for truncated data).
    """
    with warnings.catch_warnings(), _image_source(path) as source:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            check_pixels(image, max_pixels)
            if (max_side or min_side) and image.format == "JPEG":
                # draft() picks the smallest scale that keeps both sides >= the size asked for
                side = min_side or max_side
                image.draft("RGB", (side, side))
            image.seek(0)
            image.load()
            # In place: the same pixels as a transposed copy, without a full-size copy when nothing turns.
            ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image)
            if max_side and max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            return rgb.copy() if rgb is image else rgb


@contextmanager
def _image_source(path: str | Path | bytes | BinaryIO) -> Iterator[BinaryIO]:
    """A binary file for ``Image.open``; a path must be a regular file (``NotRegularFileError`` otherwise), so a
    FIFO or a device under an image name fails at once instead of blocking the reader."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        yield io.BytesIO(path)
    elif isinstance(path, (str, os.PathLike)):
        fd, _ = open_regular_file(path)
        with os.fdopen(fd, "rb") as handle:
            yield handle
    else:
        yield path
