"""``taskgalaxy export``: the ``final`` stage in a trainer's format, with an image folder its paths resolve in.

Every format (``processors.publish.formats``: LLaVA, TRL, LLaMA-Factory, ms-swift, InternVL, Qwen-VL) is
written from the same records (``processors.publish.records``). The formats that name image files get
``DIR/images/<image>`` (``<image>`` the images-stage path, ``<root name>/<path in root>``) as a symlink (or a
copy) of the real file under the image root, so the files and the folder are a complete dataset wherever the
source images live; TRL's Parquet embeds the images instead. ``tasktype.txt`` (the taxonomy's leaves) is
written beside them. ``--llava OUT.json`` is the LLaVA format with the JSON's own name (and ``--image-root``).

What the export reads is checked before anything is written: the final stage's shards verify, every image
resolves under an image root the run's config vouches for (``loaders.images.paths.trusted_roots``) and is a
regular file, and no file of someone else's stands where a link would go (``processors.publish.imagefolder``).
What it writes appears whole or not at all: a new image folder is filled beside its target and renamed into
place, links added to an existing one are taken back, and the files are renamed over their targets last. Each
file is staged on disk as the format's ``render`` yields it (TRL's Parquet shards are written straight to their
staged paths), so no format holds its output in memory whole. The output folder, like the image folder, may
not lie in the run folder or the run's image store (``checked_out_dir``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder import runfolder as rf
from builder.outputs import load_stage_output, require_intact_stage
from processors.publish.formats import FORMATS
from processors.publish.formats.base import IMAGES, Context
from processors.publish.imagefolder import (  # noqa: F401 - ImageRootError, _place_image: imported from here
    ImageRootError,
    _place_image,
    checked_image_root,
    checked_out_dir,
)
from processors.publish.imagefolder import place_images as fill_image_folder
from processors.publish.records import printable, read_samples, sample_from_row  # noqa: F401 - printable: API
from processors.publish.writes import Writes, is_write_failure, write_failure

logger = logging.getLogger(__name__)

DATASET_NAME = "taskgalaxy"  # the dataset's name in LLaMA-Factory's dataset_info.json and InternVL's meta


@dataclass
class ExportResult:
    samples: int
    json_path: Path  # the main file (for TRL: the Parquet folder)
    image_root: Path | None  # None: the format embeds its images
    tasktype_path: Path | None
    format: str = "llava"
    files: list[Path] | None = None  # every file written, the image links aside
    neutralized: int = 0  # literal <image>-like placeholders in questions/answers written `< image>`


def llava_records(run_dir: Path) -> list[dict]:
    """The final stage's rows as LLaVA records (text without control characters, see ``records.printable``,
    and without a second image token, see ``records.neutral``), sorted by id so the file is identical across
    reruns."""
    require_intact_stage(run_dir, "final")
    final = load_stage_output(run_dir, "final")
    return sorted((sample_from_row(row).llava() for row in final), key=lambda r: r["id"])


def export_llava(run_dir: Path, out_json: Path, *, resolve_image: Callable[[str], Path],
                 image_root: Path | None = None, copy_images: bool = False, place_images: bool = True,
                 protected: Sequence[Path] = ()) -> ExportResult:
    """``taskgalaxy export --llava OUT.json``: ``export`` in the LLaVA format, the JSON named ``out_json``.
    ``place_images=False`` writes the JSON only (the Hub copy, whose images travel inside Parquet)."""
    out_json = Path(os.path.realpath(out_json.parent)) / out_json.name  # `out/../x.json` is ./x.json
    return export(run_dir, "llava", out_json.parent, resolve_image=resolve_image, image_root=image_root,
                  copy_images=copy_images, place_images=place_images, protected=protected, main_name=out_json.name)


def export(run_dir: Path, format_name: str, out_dir: Path, *, resolve_image: Callable[[str], Path],
           copy_images: bool = False, image_root: Path | None = None, place_images: bool = True,
           protected: Sequence[Path] = (), main_name: str | None = None) -> ExportResult:
    """Write the kept samples of ``run_dir`` into ``out_dir`` as ``format_name`` reads them (a key of
    ``FORMATS``), with the image folder ``out_dir/images`` (``image_root``: another one, LLaVA only).
    ``protected``: folders besides the run folder that the image folder must not lie in (``checked_image_root``).

    ``resolve_image`` decides which files may be read: the command line passes
    ``loaders.images.paths.trusted_image_resolver``, which refuses files outside the roots the config named."""
    fmt = FORMATS[format_name]
    if image_root is not None and format_name != "llava":
        raise ImageRootError(f"--image-root is for the LLaVA format only: {format_name}'s image paths are "
                             "relative to the output folder (its images go to images/ in it); nothing was written.")
    out_dir = checked_out_dir(out_dir, run_dir, protected)
    main_name = main_name or fmt.main_name
    samples = read_samples(run_dir, resolve_image)
    place = place_images and fmt.images
    image_root = checked_image_root(image_root or out_dir / IMAGES, run_dir, protected) if place else None
    tasktype_text = _tasktype(run_dir)
    tasktype = out_dir / "tasktype.txt" if tasktype_text is not None else None
    main = out_dir / main_name
    writes = Writes()
    try:
        if place:
            fill_image_folder({s.image: s.file for s in samples}, image_root, copy=copy_images, writes=writes)
        writes.file(out_dir / "tasktype.txt", tasktype_text, what="the task type list")
        files: list[Path] = []  # only the paths: each file is staged on disk as render yields it
        for file in fmt.render(samples, Context(out_dir, DATASET_NAME, main_name)):
            writes.file(out_dir / file.path, file.data, what=file.what)
            files.append(out_dir / file.path)
        written = set(files)
        for pattern in fmt.owns:  # an earlier export's files that this one does not write again
            for stale in sorted(set(out_dir.glob(pattern)) - written):
                writes.remove(stale)
        writes.commit()
    except BaseException as exc:
        writes.undo()
        if not is_write_failure(exc):
            raise
        doing, path = writes.doing
        kept = f"{main} and {image_root} are" if place else f"{main} is"
        raise write_failure(exc, doing=doing, path=path, command="`taskgalaxy export`",
                            outcome=f"Nothing was exported: {kept} as before (what this export had written so "
                                    "far was taken back, no temporary file is left).") from exc
    neutralized = sum(s.neutralized for s in samples)
    if neutralized:
        logger.warning("%d literal <image>/<video>/<audio> in questions or answers written as `< image>` (and so "
                       "on): no trainer reads them as a second placeholder", neutralized)
    logger.info("exported %d samples as %s to %s%s", len(samples), format_name, main,
                f" (images under {image_root})" if place else "")
    return ExportResult(len(samples), main, image_root, tasktype, format_name, files, neutralized)


def _tasktype(run_dir: Path) -> bytes | None:
    folder = rf.find_stage_dir(run_dir, "taxonomy")
    source = folder / "tasktype.txt" if folder else None
    if source is None or not source.exists():
        logger.warning("no tasktype.txt in %s: the taxonomy stage has not finished", run_dir)
        return None
    return source.read_bytes()
