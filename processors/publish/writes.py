"""An export's or a push's writes as one transaction, and the error that names a write that failed.

``Writes`` stages files and a new folder beside their targets and renames them at ``commit``; ``undo`` takes
back whatever was done, so a refused or failed export leaves no trace. ``write_failure`` turns the ``OSError``
of a full disk, a read-only folder or a missing permission into one paragraph: what failed, the path, why,
what is complete, what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO
from dataclasses import dataclass, field
from pathlib import Path

from builder import runfolder as rf

logger = logging.getLogger(__name__)


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


def is_write_failure(exc: BaseException) -> bool:
    """An ``OSError`` the system raised (it has an errno), not one of this module's refusals with a message."""
    return isinstance(exc, OSError) and exc.errno is not None


@dataclass
class Writes:
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

    def file(self, target: Path, data: bytes | Callable[[BinaryIO], None] | None, *, what: str = "a file") -> None:
        """Stage ``data`` for ``target`` (None: nothing to write there; a callable: called with the staged
        file's binary handle, so a big file is written straight to disk); ``what`` names it in an error."""
        if data is None:
            return
        self.doing = (f"write {what}", target)
        self.make_parents(target)
        fd, tmp = tempfile.mkstemp(prefix=f"{rf.TMP_PREFIX}{target.name}-", dir=target.parent)
        self._undo.append(lambda: Path(tmp).unlink(missing_ok=True))
        rf.plain_mode(Path(tmp))
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
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

    def remove(self, path: Path) -> None:
        """Remove an earlier export's file that this one replaces by nothing; put back by ``undo``."""
        self.doing = ("remove an earlier export's file", path)
        backup = _keep_aside(path)
        path.unlink()
        self._backups.append(backup)
        self._undo.append(lambda: os.replace(backup, path))

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
