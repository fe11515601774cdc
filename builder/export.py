"""``taskgalaxy export``: the ``final`` stage as LLaVA JSON, with an image folder the paths resolve in.

Every sample's ``image`` is its images-stage path (``<root name>/<path in root>``); ``DIR/<image>`` is made a
symlink (or a copy) of the real file under the image root, so the JSON and the folder are a complete LLaVA
dataset wherever the source images live. ``tasktype.txt`` (the taxonomy's leaves) is written beside it.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builder import runfolder as rf
from builder.outputs import load_stage_output

logger = logging.getLogger(__name__)

LLAVA_FIELDS = ("id", "image", "task_type", "conversations")


@dataclass
class ExportResult:
    samples: int
    json_path: Path
    image_root: Path
    tasktype_path: Path | None


def llava_records(run_dir: Path) -> list[dict]:
    """The final stage's rows as LLaVA records, sorted by id so the file is identical across reruns."""
    final = load_stage_output(run_dir, "final")
    records = [{name: row[name] for name in LLAVA_FIELDS} for row in final]
    return sorted(records, key=lambda r: r["id"])


def export_llava(
    run_dir: Path,
    out_json: Path,
    *,
    resolve_image: Callable[[str], Path],
    image_root: Path | None = None,
    copy_images: bool = False,
    place_images: bool = True,
) -> ExportResult:
    """``place_images=False`` writes the JSON only (the Hub copy, whose images travel inside Parquet)."""
    records = llava_records(run_dir)
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the final stage of {run_dir} holds duplicate ids; rerun the final stage")
    image_root = image_root or out_json.parent / "images"
    for image in sorted({r["image"] for r in records}):
        source = resolve_image(image)
        if place_images:
            _place_image(source, image_root / image, copy=copy_images)
        elif not source.is_file():
            raise FileNotFoundError(f"image {source} (needed by the export) is missing; was the image root moved?")
    rf.atomic_write_bytes(out_json, json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
    tasktype = _copy_tasktype(run_dir, out_json.parent / "tasktype.txt")
    logger.info("exported %d samples to %s%s", len(records), out_json,
                f" (images under {image_root})" if place_images else "")
    return ExportResult(len(records), out_json, image_root, tasktype)


def _place_image(source: Path, target: Path, *, copy: bool) -> None:
    """Link or copy ``source`` to ``target``; never deletes a file that is not our own link or copy of it."""
    if not source.is_file():
        raise FileNotFoundError(f"image {source} (needed by the export) is missing; was the image root moved?")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return  # the image root holds the source itself (or our link to it): nothing to do
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        if copy and filecmp.cmp(source, target, shallow=False):
            return
        raise FileExistsError(f"{target} exists and is not this export's link to {source}; "
                              "choose an empty --image-root")
    if copy:
        shutil.copyfile(source, target)
    else:
        os.symlink(os.path.abspath(source), target)


def _copy_tasktype(run_dir: Path, target: Path) -> Path | None:
    folder = rf.find_stage_dir(run_dir, "taxonomy")
    source = folder / "tasktype.txt" if folder else None
    if source is None or not source.exists():
        logger.warning("no tasktype.txt in %s: the taxonomy stage has not finished", run_dir)
        return None
    shutil.copyfile(source, target)
    return target
