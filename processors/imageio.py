"""Opening an image the one way every step uses: first frame, EXIF orientation applied, RGB, bounded size.

CLIP matching, the GPT-4o data URLs and the referees all read images through ``open_rgb`` so that they see
exactly the same pixels the images stage validated.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

# Decompression-bomb guard: PIL warns above MAX_IMAGE_PIXELS and raises above twice that. We raise at the
# limit itself, so a hostile file is a failure row instead of a 20 GB allocation.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageTooLargeError(ValueError):
    pass


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode (CMYK, 16-bit, palette with alpha, LA, ...) to RGB; alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        extrema = image.getextrema()
        high = max(1, extrema[1] if isinstance(extrema, tuple) else 255)
        image = image.point(lambda v: v * (255.0 / high)).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path, *, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully and return an RGB image (first frame, upright), optionally downscaled.

    Raises ``ImageTooLargeError`` above ``max_pixels`` and PIL's own errors for broken files.
    """
    with Image.open(path) as image:
        if image.width * image.height > max_pixels:
            raise ImageTooLargeError(f"{image.width}x{image.height} exceeds the {max_pixels}-pixel limit")
        if max_side and image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))  # decode at reduced scale: much faster for thumbnails
        image.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        upright = ImageOps.exif_transpose(image)
        rgb = to_rgb(upright)
        if max_side and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        return rgb.copy() if rgb is image else rgb
