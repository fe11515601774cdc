"""One way for a stage to find the file of an ``image_id``, with one error policy: a row whose image cannot be
found (not in the images stage, a path that escapes its root, a file that is gone) fails alone as
``image_missing``; it never stops the shard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder.outputs import image_paths_by_id

IMAGE_MISSING = "image_missing"  # the reason code of a row whose image cannot be found


class ImageUnavailable(LookupError):
    """The image of an input row cannot be found (not in the images stage, or its file is gone)."""


def image_locator(ctx: Any) -> Callable[[str], Path]:
    """``image_id -> Path`` over the images stage's rows, raising ``ImageUnavailable`` with the reason."""
    from loaders.images.paths import PathEscapeError, load_roots, resolve_image_path

    path_of = image_paths_by_id(ctx.load_stage("images"))
    roots = load_roots(ctx.run_dir)

    def locate(image_id: str) -> Path:
        if image_id not in path_of:
            raise ImageUnavailable(f"image {image_id} is not in the images stage output")
        try:
            path = resolve_image_path(ctx.run_dir, path_of[image_id], roots)
        except PathEscapeError as exc:
            raise ImageUnavailable(str(exc)) from None
        if not path.is_file():
            raise ImageUnavailable(f"the file of image {image_id} is gone: {path}")
        return path

    return locate
