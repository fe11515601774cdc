"""One way for a stage to find the file of an ``image_id``, with one error policy: a row whose image cannot be
found (not in the images stage, a path that escapes its root, a file that is gone) fails alone as
``image_missing``; it never stops the shard."""

from __future__ import annotations

import os
import stat
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
    # An image is resolved (a realpath, checked against its root's, itself resolved once) on its first row;
    # its next rows (every question about it) only ``lstat`` the file: still a regular file, not a symlink.
    # A symlink is resolved and checked again on every row, since where it leads can change.
    checked: dict[str, Path] = {}

    def locate(image_id: str) -> Path:
        path = checked.get(image_id)
        if path is not None:
            try:
                info = os.lstat(path)
            except OSError:
                info = None
            if info is not None and stat.S_ISREG(info.st_mode):
                return path
            del checked[image_id]
        if image_id not in path_of:
            raise ImageUnavailable(f"image {image_id} is not in the images stage output")
        try:
            path = resolve_image_path(ctx.run_dir, path_of[image_id], roots)
        except PathEscapeError as exc:
            raise ImageUnavailable(str(exc)) from None
        try:
            info = os.lstat(path)
            regular = stat.S_ISREG(info.st_mode) or (stat.S_ISLNK(info.st_mode) and path.is_file())
        except OSError:
            regular = False
        if not regular:
            raise ImageUnavailable(f"the file of image {image_id} is gone: {path}")
        if not stat.S_ISLNK(info.st_mode):
            checked[image_id] = path
        return path

    return locate
