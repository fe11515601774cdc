"""List image files under a folder: recursive, sorted, symlinks never followed out of the root, nothing dropped
without a count.

A symlinked *file* is listed, but reading it fails unless its target lies inside the root; symlinked *folders* are not
descended into at all (``os.walk(followlinks=False)``), so a link loop or a link to ``/`` cannot blow up a
listing. Order is the sorted POSIX relative path, so listings are identical on every machine.

Names that are listed are only *names*: a FIFO, socket or device called ``x.jpg`` is listed like any file and
fails when read, with reason ``image_not_regular_file`` (``loaders.images.fetch``), so it shows in the failure
counts instead of hanging a worker or vanishing. What is not listed is counted by why (``FolderListing.skipped``):

=================== ==================================================================================
``hidden_file``     a file whose name starts with ``.`` (``.DS_Store``, macOS ``._photo.jpg`` companions)
``hidden_folder``   a folder whose name starts with ``.`` (``.git``, ``.thumbnails``); not searched
``linked_folder``   a symlink to a folder; not followed
``other_extension`` a file whose name has none of the source's ``extensions``
``unreadable_folder`` a folder that could not be listed (permissions); logged with the error
=================== ==================================================================================
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class FolderListing:
    """The image files found under a root and, by reason, how many entries were passed over."""

    files: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def merge(self, other: "FolderListing") -> None:
        self.files += other.files
        self.skipped.update(other.skipped)


def scan_images(root: Path, extensions: tuple[str, ...]) -> FolderListing:
    """The relative POSIX paths of the files under ``root`` ending with one of ``extensions``, and the skip counts.

    A file symlink pointing outside the root is still listed: reading it fails with reason ``path_escape``
    (``loaders.images.fetch``), so it shows in the failure counts instead of vanishing.
    """
    endings = tuple(e.lower() for e in extensions)
    listing = FolderListing()

    def unreadable(error: OSError) -> None:  # os.walk would otherwise pass over it without a word
        listing.skipped["unreadable_folder"] += 1
        logger.warning("cannot list %s (%s); its images are not taken", error.filename, error.strerror or error)

    for folder, subdirs, files in os.walk(root, followlinks=False, onerror=unreadable):
        subdirs[:] = _searched_subdirs(folder, subdirs, listing.skipped)
        for name in files:
            if name.startswith("."):
                listing.skipped["hidden_file"] += 1
            elif not name.lower().endswith(endings):
                listing.skipped["other_extension"] += 1
            else:
                listing.files.append(Path(folder, name).relative_to(root).as_posix())
    listing.files.sort()
    return listing


def _searched_subdirs(folder: str, subdirs: list[str], skipped: Counter) -> list[str]:
    kept = []
    for name in subdirs:
        if os.path.islink(os.path.join(folder, name)):  # os.walk lists it but does not descend: say so
            skipped["linked_folder"] += 1
        elif name.startswith("."):
            skipped["hidden_folder"] += 1
        else:
            kept.append(name)
    return kept


def list_images(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the files under ``root`` whose names end with one of ``extensions``."""
    return scan_images(root, extensions).files
