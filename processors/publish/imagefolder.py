"""The image folder of an export: checked before the first write, then filled with symlinks (or copies).

Shared by every export format (``processors.publish.export``): the folder may not lie in the run folder or the
run's image store, a symlink planted in it is not followed, every source is a regular file under a root the
run's config vouches for, and nothing that is not the export's own link or copy is ever replaced.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from builder import runfolder as rf
from processors.publish.writes import Writes


class ImageRootError(ValueError):
    """An image folder (``--image-root``) the export refuses to fill; the message names it, why, and what to
    pass instead."""


def checked_image_root(image_root: Path, run_dir: Path, protected: Sequence[Path] = ()) -> Path:
    """The real folder behind ``image_root`` (symlinks and ``..`` resolved as the file system resolves them:
    ``out/../x`` is ``./x``), which the export fills. ``ImageRootError`` when it is not a folder, or lies in the
    run folder or in one of ``protected`` (the run's image store): links there would sit among the files the
    run wrote and reads back, and a later run or export would take them for its own."""
    real = Path(os.path.realpath(image_root))
    shown = f"the image folder {image_root}" + (f" (that is {real})" if str(real) != str(image_root) else "")
    _refuse_inside(real, shown, run_dir, protected, "its links",
                   "Pass --image-root a folder outside it (by default the images go to images/ beside the JSON, "
                   "so give --llava, or --out, a path outside the run folder too)")
    if real.exists() and not real.is_dir():
        raise ImageRootError(f"{shown} is a file, not a folder: pass --image-root a new or empty folder (or an "
                             "earlier export's); nothing was written.")
    return real


def checked_out_dir(out_dir: Path, run_dir: Path, protected: Sequence[Path] = ()) -> Path:
    """The real folder behind ``out_dir`` (the folder an export writes its files into, for every format), refused
    with ``ImageRootError`` like the image folder (``checked_image_root``) when it lies in the run folder or in
    one of ``protected``: the export's files would sit among the run's own."""
    real = Path(os.path.realpath(out_dir))
    shown = f"the output folder {out_dir}" + (f" (that is {real})" if str(real) != str(out_dir) else "")
    _refuse_inside(real, shown, run_dir, protected, "its files",
                   "Give --out (or --llava) a path outside it")
    return real


def _refuse_inside(real: Path, shown: str, run_dir: Path, protected: Sequence[Path], things: str, fix: str) -> None:
    for what, folder in (("the run folder", run_dir), *(("the run's image store", p) for p in protected)):
        inside = Path(os.path.realpath(folder))
        if real == inside or inside in real.parents:
            raise ImageRootError(f"{shown} lies in {what} {folder}: the export would write {things} among the "
                                 f"run's own files. {fix}; nothing was written.")


def _refuse_links_out(image_root: Path, targets: list[Path]) -> None:
    """Refuse, before the first write, a target whose folder leads out of the image folder through a symlink
    planted in it (``images/toy -> /elsewhere``): the export would write there, not in the folder it was given."""
    for target in targets:
        folder = target.parent
        while not folder.exists() and folder != image_root:
            folder = folder.parent
        real = Path(os.path.realpath(folder))
        if real != image_root and image_root not in real.parents:
            raise ImageRootError(
                f"{folder} inside the image folder {image_root} is a symlink to {real}, outside it: the export "
                "would write there. Remove that link, or pass --image-root a new or empty folder; nothing was "
                "written.")


def checked_sources(images: Iterable[str], resolve: Callable[[str], Path]) -> dict[str, Path]:
    """Every image path named -> its file; raises before anything is written if one is not usable."""
    sources = {}
    for image in sorted(set(images)):
        source = resolve(image)
        try:
            mode = os.stat(source).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"image {source} (needed by the export) is missing; was the image root "
                                    "moved? Nothing was written.") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"image {source} (needed by the export) is not a regular file; nothing was written")
        sources[image] = source
    return sources


# -- placing the image files ---------------------------------------------------------------------------
KEEP, CREATE, REPLACE_LINK = "keep", "create", "replace-link"


def _placement(source: Path, target: Path, *, copy: bool) -> str:
    """What placing ``source`` at ``target`` takes; ``FileExistsError`` when a file that is not our own link or
    copy of it stands there (an export never deletes what it did not make)."""
    if not source.is_file():
        raise FileNotFoundError(f"image {source} (needed by the export) is missing; was the image root moved?")
    if target.exists() and os.path.samefile(source, target):
        return KEEP  # the image root holds the source itself (or our link to it): nothing to do
    if target.is_symlink():
        return REPLACE_LINK  # a link of an earlier export (possibly dangling now)
    if target.exists():
        if copy and filecmp.cmp(source, target, shallow=False):
            return KEEP
        raise FileExistsError(f"{target} exists and is not this export's link to {source}; "
                              "choose an empty --image-root")
    return CREATE


def _put(source: Path, target: Path, *, copy: bool) -> None:
    """Make ``target`` a symlink to (or a copy of) ``source``; a copy is written beside it and renamed, so a
    stop never leaves half an image under the final name."""
    if not copy:
        os.symlink(os.path.abspath(source), target)
        return
    tmp = target.with_name(f"{rf.TMP_PREFIX}{target.name}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _place_image(source: Path, target: Path, *, copy: bool) -> None:
    """Link or copy ``source`` to ``target``; never deletes a file that is not our own link or copy of it."""
    action = _placement(source, target, copy=copy)
    if action == KEEP:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if action == REPLACE_LINK:
        target.unlink()
    _put(source, target, copy=copy)


def place_images(sources: dict[str, Path], image_root: Path, *, copy: bool, writes: Writes) -> None:
    """A new image folder is filled beside its target and renamed into place at commit; into an existing one
    the links go straight, each one's undo recorded. Every placement is checked before the first is made."""
    verb = "copy an image" if copy else "link an image"
    if not image_root.exists():
        writes.doing = ("make the image folder", image_root)
        staging = writes.staging_folder(image_root)
        for image, source in sources.items():
            target = staging / image
            writes.doing = (verb, image_root / image)
            target.parent.mkdir(parents=True, exist_ok=True)
            _put(source, target, copy=copy)
        return
    plan = [(source, image_root / image, _placement(source, image_root / image, copy=copy))
            for image, source in sources.items()]
    _refuse_links_out(image_root, [target for _, target, action in plan if action != KEEP])
    for source, target, action in plan:
        if action == KEEP:
            continue
        writes.doing = (verb, target)
        writes.make_parents(target)
        if action == REPLACE_LINK:
            writes.remove_link(target)
        _put(source, target, copy=copy)
        writes.created(target)
