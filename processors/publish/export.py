"""``taskgalaxy export``: the ``final`` stage as LLaVA JSON, with an image folder the paths resolve in.

Every sample's ``image`` is its images-stage path (``<root name>/<path in root>``); ``DIR/<image>`` is made a
symlink (or a copy) of the real file under the image root, so the JSON and the folder are a complete LLaVA
dataset wherever the source images live. ``tasktype.txt`` (the taxonomy's leaves) is written beside it.

What the export reads is checked before anything is written: the final stage's shards verify, every image
resolves under an image root the run's config vouches for (``loaders.images.paths.trusted_roots``) and is a
regular file, and no file of someone else's stands where a link would go. What it writes appears whole or not
at all: a new image folder is filled beside its target and renamed into place, links added to an existing
one are taken back, and the JSON and ``tasktype.txt`` are renamed over their targets last.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import runfolder as rf
from builder.outputs import load_stage_output, require_intact_stage
from processors.publish.writes import Writes, is_write_failure, write_failure
from processors.qa.validate import strip_control

logger = logging.getLogger(__name__)

LLAVA_FIELDS = ("id", "image", "task_type", "conversations")
TEXT_FIELDS = ("task_type", "conversations")  # model text; ``image`` is a path, kept byte for byte


@dataclass
class ExportResult:
    samples: int
    json_path: Path
    image_root: Path
    tasktype_path: Path | None


# The QA stage strips these from model text already (``strip_control``); the export strips them again because
# it also reads final stages of older runs and of other pipelines, and a NUL or an ANSI escape in a published
# JSON breaks the tools that read it.
def printable(value):
    """``value`` (a string, or lists/dicts of them) without ANSI escape sequences and control characters;
    newline and tab are kept."""
    if isinstance(value, str):
        return strip_control(value)
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {k: printable(v) for k, v in value.items()}
    return value


def llava_records(run_dir: Path) -> list[dict]:
    """The final stage's rows as LLaVA records (text without control characters, see ``printable``), sorted
    by id so the file is identical across reruns."""
    require_intact_stage(run_dir, "final")
    final = load_stage_output(run_dir, "final")
    records = [{name: printable(row[name]) if name in TEXT_FIELDS else row[name] for name in LLAVA_FIELDS}
               for row in final]
    return sorted(records, key=lambda r: r["id"])


def export_llava(
    run_dir: Path,
    out_json: Path,
    *,
    resolve_image: Callable[[str], Path],
    image_root: Path | None = None,
    copy_images: bool = False,
    place_images: bool = True,
    protected: Sequence[Path] = (),
) -> ExportResult:
    """``place_images=False`` writes the JSON only (the Hub copy, whose images travel inside Parquet).
    ``protected``: folders besides the run folder that the image folder must not lie in (``checked_image_root``).

    ``resolve_image`` decides which files may be read: the command line passes
    ``loaders.images.paths.trusted_image_resolver``, which refuses files outside the roots the config named."""
    records = llava_records(run_dir)
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the final stage of {run_dir} holds duplicate ids; rerun the final stage")
    out_json = Path(os.path.realpath(out_json.parent)) / out_json.name  # `out/../x.json` is ./x.json
    image_root = image_root or out_json.parent / "images"
    if place_images:
        image_root = checked_image_root(image_root, run_dir, protected)
    sources = _checked_sources(records, resolve_image)
    tasktype_text = _tasktype(run_dir)
    tasktype = out_json.parent / "tasktype.txt" if tasktype_text is not None else None
    writes = Writes()
    try:
        if place_images:
            _place_images(sources, image_root, copy=copy_images, writes=writes)
        writes.file(out_json.parent / "tasktype.txt", tasktype_text, what="the task type list")
        writes.file(out_json, json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"), what="the LLaVA JSON")
        writes.commit()
    except BaseException as exc:
        writes.undo()
        if not is_write_failure(exc):
            raise
        doing, path = writes.doing
        kept = f"{out_json} and {image_root} are" if place_images else f"{out_json} is"
        raise write_failure(exc, doing=doing, path=path, command="`taskgalaxy export`",
                            outcome=f"Nothing was exported: {kept} as before (what this export had written so "
                                    "far was taken back, no temporary file is left).") from exc
    logger.info("exported %d samples to %s%s", len(records), out_json,
                f" (images under {image_root})" if place_images else "")
    return ExportResult(len(records), out_json, image_root, tasktype)


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
    for what, folder in (("the run folder", run_dir), *(("the run's image store", p) for p in protected)):
        inside = Path(os.path.realpath(folder))
        if real == inside or inside in real.parents:
            raise ImageRootError(
                f"{shown} lies in {what} {folder}: the export would write its links among the run's own files. "
                "Pass --image-root a folder outside it (by default the images go to images/ beside the JSON, "
                "so give --llava a path outside the run folder too); nothing was written.")
    if real.exists() and not real.is_dir():
        raise ImageRootError(f"{shown} is a file, not a folder: pass --image-root a new or empty folder (or an "
                             "earlier export's); nothing was written.")
    return real


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


def _checked_sources(records: list[dict], resolve: Callable[[str], Path]) -> dict[str, Path]:
    """Every image the records name -> its file; raises before anything is written if one is not usable."""
    sources = {}
    for image in sorted({r["image"] for r in records}):
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


def _place_images(sources: dict[str, Path], image_root: Path, *, copy: bool, writes: Writes) -> None:
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


def _tasktype(run_dir: Path) -> bytes | None:
    folder = rf.find_stage_dir(run_dir, "taxonomy")
    source = folder / "tasktype.txt" if folder else None
    if source is None or not source.exists():
        logger.warning("no tasktype.txt in %s: the taxonomy stage has not finished", run_dir)
        return None
    return source.read_bytes()
