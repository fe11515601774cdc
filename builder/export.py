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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder import runfolder as rf
from builder.outputs import load_stage_output, require_intact_stage

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
    require_intact_stage(run_dir, "final")
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
    """``place_images=False`` writes the JSON only (the Hub copy, whose images travel inside Parquet).

    ``resolve_image`` decides which files may be read: the command line passes
    ``loaders.images.paths.trusted_image_resolver``, which refuses files outside the roots the config named."""
    records = llava_records(run_dir)
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the final stage of {run_dir} holds duplicate ids; rerun the final stage")
    image_root = image_root or out_json.parent / "images"
    sources = _checked_sources(records, resolve_image)
    tasktype_text = _tasktype(run_dir)
    tasktype = out_json.parent / "tasktype.txt" if tasktype_text is not None else None
    writes = _Writes()
    try:
        if place_images:
            _place_images(sources, image_root, copy=copy_images, writes=writes)
        writes.file(out_json.parent / "tasktype.txt", tasktype_text)
        writes.file(out_json, json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
        writes.commit()
    except BaseException:
        writes.undo()
        raise
    logger.info("exported %d samples to %s%s", len(records), out_json,
                f" (images under {image_root})" if place_images else "")
    return ExportResult(len(records), out_json, image_root, tasktype)


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


def _place_images(sources: dict[str, Path], image_root: Path, *, copy: bool, writes: "_Writes") -> None:
    """A new image folder is filled beside its target and renamed into place at commit; into an existing one
    the links go straight, each one's undo recorded. Every placement is checked before the first is made."""
    if not image_root.exists():
        staging = writes.staging_folder(image_root)
        for image, source in sources.items():
            target = staging / image
            target.parent.mkdir(parents=True, exist_ok=True)
            _put(source, target, copy=copy)
        return
    plan = [(source, image_root / image, _placement(source, image_root / image, copy=copy))
            for image, source in sources.items()]
    for source, target, action in plan:
        if action == KEEP:
            continue
        writes.make_parents(target)
        if action == REPLACE_LINK:
            writes.remove_link(target)
        _put(source, target, copy=copy)
        writes.created(target)


# -- all or nothing -----------------------------------------------------------------------------------
@dataclass
class _Writes:
    """The export's writes as one transaction: files and a new image folder staged beside their targets and
    renamed at ``commit`` (the JSON last); ``undo`` takes back whatever was done, in reverse order, so a
    refused or failed export leaves no trace and the previous export, if any, as it was."""

    _pending: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, target): renamed at commit
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _backups: list[Path] = field(default_factory=list)  # files replaced at commit, until it has succeeded

    def make_parents(self, path: Path) -> None:
        missing = []
        for parent in path.parents:
            if parent.exists():
                break
            missing.append(parent)
        for folder in reversed(missing):
            folder.mkdir()
            self._undo.append(lambda folder=folder: _rmdir_if_empty(folder))

    def staging_folder(self, target: Path) -> Path:
        self.make_parents(target)
        staging = rf.plain_mode(Path(tempfile.mkdtemp(prefix=f"{rf.TMP_PREFIX}{target.name}-", dir=target.parent)))
        self._undo.append(lambda: shutil.rmtree(staging, ignore_errors=True))
        self._pending.append((staging, target))
        return staging

    def file(self, target: Path, data: bytes | None) -> None:
        """Stage ``data`` for ``target`` (None: nothing to write there)."""
        if data is None:
            return
        self.make_parents(target)
        fd, tmp = tempfile.mkstemp(prefix=f"{rf.TMP_PREFIX}{target.name}-", dir=target.parent)
        self._undo.append(lambda: Path(tmp).unlink(missing_ok=True))
        rf.plain_mode(Path(tmp))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._pending.append((Path(tmp), target))

    def created(self, path: Path) -> None:
        self._undo.append(lambda: path.unlink(missing_ok=True))

    def remove_link(self, link: Path) -> None:
        previous = os.readlink(link)
        link.unlink()
        self._undo.append(lambda: _restore_link(link, previous))

    def commit(self) -> None:
        for staged, target in self._pending:
            if staged.is_dir():
                os.rename(staged, target)  # refuses a target that appeared meanwhile (never merges)
                self._undo.append(lambda staged=staged, target=target: os.rename(target, staged))
                continue
            backup = _keep_aside(target)
            if backup is not None:
                self._backups.append(backup)
            os.replace(staged, target)
            self._undo.append(lambda target=target, backup=backup: _put_back(target, backup))
        self._undo.clear()  # committed: nothing to take back any more
        for backup in self._backups:
            backup.unlink(missing_ok=True)
        self._backups.clear()

    def undo(self) -> None:
        for step in reversed(self._undo):
            try:
                step()
            except OSError as exc:  # keep taking back the rest; say what could not be
                logger.warning("export: could not take back a partial write (%s)", exc)
        self._undo.clear()
        for backup in self._backups:
            backup.unlink(missing_ok=True)
        self._backups.clear()


def _keep_aside(target: Path) -> Path | None:
    """A hard link to the file about to be replaced, so an undo after the rename can put it back."""
    if not target.is_file():
        return None
    backup = target.with_name(f"{rf.TMP_PREFIX}previous-{target.name}")
    backup.unlink(missing_ok=True)
    try:
        os.link(target, backup)
    except OSError:  # a file system without hard links
        shutil.copy2(target, backup)
    return backup


def _put_back(target: Path, backup: Path | None) -> None:
    if backup is None:
        target.unlink(missing_ok=True)
    else:
        os.replace(backup, target)


def _restore_link(link: Path, previous: str) -> None:
    link.unlink(missing_ok=True)
    os.symlink(previous, link)


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # something else lives there now: not ours to remove


def _tasktype(run_dir: Path) -> bytes | None:
    folder = rf.find_stage_dir(run_dir, "taxonomy")
    source = folder / "tasktype.txt" if folder else None
    if source is None or not source.exists():
        logger.warning("no tasktype.txt in %s: the taxonomy stage has not finished", run_dir)
        return None
    return source.read_bytes()
