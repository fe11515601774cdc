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

import errno
import filecmp
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import runfolder as rf
from builder.outputs import load_stage_output, require_intact_stage

logger = logging.getLogger(__name__)

LLAVA_FIELDS = ("id", "image", "task_type", "conversations")
TEXT_FIELDS = ("task_type", "conversations")  # model text; ``image`` is a path, kept byte for byte


@dataclass
class ExportResult:
    samples: int
    json_path: Path
    image_root: Path
    tasktype_path: Path | None


# The QA stage strips these from model text already (``processors.qa.validate.strip_control``, the same
# rule); the export strips them again because it also reads final stages of older runs and of other
# pipelines, and a NUL or an ANSI escape in a published JSON breaks the tools that read it.
_ANSI_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]?")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(value):
    """``value`` (a string, or lists/dicts of them) without ANSI escape sequences and control characters;
    newline and tab are kept."""
    if isinstance(value, str):
        return _CONTROL_CHARS.sub("", _ANSI_SEQUENCE.sub("", value))
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {k: printable(v) for k, v in value.items()}
    return value


class OutputWriteError(rf.RunFolderError):
    """A file of an export or a push that could not be written (a full disk, a read-only folder, no
    permission). The message is one paragraph in ``runfolder.folder_error``'s style: what failed, the path,
    why, what was already complete, what to do; ``doing``, ``path`` and the ``OSError`` it was raised from let
    a caller (``push``) say it again in its own terms."""

    def __init__(self, message: str, *, doing: str, path: Path, cause: str, code: int | None):
        super().__init__(message, rf.EXIT_IO)
        self.doing, self.path, self.cause, self.code = doing, Path(path), cause, code


def write_failure(exc: OSError, *, doing: str, path: Path, outcome: str, command: str) -> OutputWriteError:
    """``exc`` (raised while trying to ``doing`` at ``path``) as an ``OutputWriteError``: ``outcome`` says what
    is complete or untouched, ``command`` what to rerun once the cause is fixed (``"`taskgalaxy export`"``)."""
    cause = rf._CAUSES.get(exc.errno, exc.strerror or str(exc))
    folder = next((p for p in Path(path).parents if p.exists()), Path(path).parent)  # one `df` can look at
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"Free space on the disk that holds {folder} (see `df -h {folder}`), then rerun {command}."
    elif exc.errno == errno.EROFS:
        fix = f"Write to a folder on a writable disk, then rerun {command}."
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = f"Give this user write access to {folder} (or choose another folder), then rerun {command}."
    else:
        fix = f"Check the disk and the folder, then rerun {command}."
    return OutputWriteError(f"could not {doing} ({path}): {cause} [errno {exc.errno}]. {outcome} {fix}",
                            doing=doing, path=Path(path), cause=cause, code=exc.errno)


def _is_write_failure(exc: BaseException) -> bool:
    """An ``OSError`` the system raised (it has an errno), not one of this module's refusals with a message."""
    return isinstance(exc, OSError) and exc.errno is not None


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
    writes = _Writes()
    try:
        if place_images:
            _place_images(sources, image_root, copy=copy_images, writes=writes)
        writes.file(out_json.parent / "tasktype.txt", tasktype_text, what="the task type list")
        writes.file(out_json, json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"), what="the LLaVA JSON")
        writes.commit()
    except BaseException as exc:
        writes.undo()
        if not _is_write_failure(exc):
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


def _place_images(sources: dict[str, Path], image_root: Path, *, copy: bool, writes: "_Writes") -> None:
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


# -- all or nothing -----------------------------------------------------------------------------------
@dataclass
class _Writes:
    """The export's writes as one transaction: files and a new image folder staged beside their targets and
    renamed at ``commit`` (the JSON last); ``undo`` takes back whatever was done, in reverse order, so a
    refused or failed export leaves no trace and the previous export, if any, as it was."""

    _pending: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, target): renamed at commit
    doing: tuple[str, Path] = ("write", Path("."))  # the step under way, for the message if it fails
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

    def file(self, target: Path, data: bytes | None, *, what: str = "a file") -> None:
        """Stage ``data`` for ``target`` (None: nothing to write there); ``what`` names it in an error."""
        if data is None:
            return
        self.doing = (f"write {what}", target)
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
            self.doing = ("move the finished file into place", target)
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
        try:
            shutil.copy2(target, backup)
        except BaseException:  # a disk too full for the copy: no half backup left behind
            backup.unlink(missing_ok=True)
            raise
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
