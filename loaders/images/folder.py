"""List image files under a folder: recursive, sorted, symlinks never followed out of the root.

A symlinked *file* is listed, but reading it fails unless its target lies inside the root; symlinked *folders* are not
descended into at all (``os.walk(followlinks=False)``), so a link loop or a link to ``/`` cannot blow up a
listing. Order is the sorted POSIX relative path, so listings are identical on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def list_images(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the files under ``root`` whose names end with one of ``extensions``.

    A file symlink pointing outside the root is still listed: reading it fails with reason ``path_escape``
    (``loaders.images.fetch``), so it shows in the failure counts instead of vanishing.
    """
    endings = tuple(e.lower() for e in extensions)
    found: list[str] = []
    for folder, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if name.lower().endswith(endings) and not name.startswith("."):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)
