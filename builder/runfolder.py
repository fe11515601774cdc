"""The run folder on disk: stage folders, atomic writes and each stage's state.json (the run lock:
``builder.runlock``).

Layout (design.md §4)::

    <run_dir>/
      run.lock                  held (flock) while a run is active; released by the OS even on SIGKILL
      config.yaml               the config this run used, as its file gave it (it loads back to the same
                                config: ``builder.config.dump_config``; no secrets, only env var *names*)
      cache/                    request cache, embedding caches
      NN_<stage>/
        state.json              fingerprint, shard list, counts, usage; rewritten atomically
        input.arrow             source stages only: the listed input rows, frozen so shards stay stable
        shard-00000.arrow       output rows of shard 0 (a `datasets` Arrow file); present = shard finished
        failures/shard-00000.arrow  rows (and items) of shard 0 that did not make it, with reason codes
        stats/shard-00000.json  per-shard counts and usage, and the fingerprint and shard layout it was
                                computed under (enough to rebuild a damaged state.json)

What cannot be used (a full disk, a read-only or pseudo file system, a damaged file) raises ``RunFolderError``:
one paragraph naming what failed, the path, the stage and the fix, with the exit code the command line uses.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
LOCK_FILE = "run.lock"
TMP_PREFIX = ".tmp-"


EXIT_UNUSABLE = 2  # as for a bad config: nothing ran, fix the folder (or --run-dir) and rerun
EXIT_IO = 74  # EX_IOERR (sysexits.h): a file of the run folder could not be written or read mid-way
EXIT_DATA = 65  # EX_DATAERR (sysexits.h): a file of the run folder is damaged or not to be trusted


class RunFolderError(RuntimeError):
    """The run folder, or a file in it, cannot be used: a full disk, a read-only or pseudo file system, no
    permission, a damaged file. The message is one paragraph naming what failed, the path, the stage (where
    one was running) and what to do; ``exit_code`` is what the command line exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_IO):
        super().__init__(message)
        self.exit_code = exit_code


class CorruptFileError(RunFolderError, ValueError):
    """A JSON file of the run folder that does not parse (a disk fault, a power loss on a non-atomic copy, an
    edit). A ``ValueError`` too, as ``json.loads`` raised before."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_DATA)


# Errors that say "this disk or folder cannot take it", whichever file they hit: never the stage's own fault.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}
PSEUDO_FILESYSTEMS = {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
                      "configfs", "bpf", "pstore", "fusectl", "mqueue", "binfmt_misc"}

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.ENOENT: "a folder on the way does not exist (or cannot hold files)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "something is already at that path (a file where a folder goes?)",
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EIO: "the disk reported an I/O error",
}


def _hint(code: int | None, run_dir: Path | None) -> str:
    where = f" {run_dir}" if run_dir else ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"Free space on the disk that holds the run folder{where} (see `df -h{where}`), then rerun the same "
                "command: finished shards are kept and the resume continues where this stopped.")
    if code == errno.EROFS:
        return ("`taskgalaxy run` has to write there (its lock, config.yaml, shards and state): remount it "
                "writable, or copy the run folder to a writable disk and pass --run-dir; `status`, `export` and "
                "`push` only read a finished run and work on a read-only one as it is.")
    if code in (errno.EACCES, errno.EPERM):
        return "Give this user write access to the run folder, or pass --run-dir a folder it may write."
    if code in (errno.ENOENT, errno.ENOTDIR):
        return "Pass --run-dir (or set run.run_dir to) a folder on a real disk."
    return "Check the disk and the folder, then rerun the same command: finished shards are kept."


def stage_of(path: Path) -> str | None:
    """The stage whose folder (``NN_<stage>``) holds ``path``, if any."""
    for part in reversed(Path(path).parts[:-1]):
        if len(part) > 3 and part[:2].isdigit() and part[2] == "_":
            return part[3:]
    return None


def folder_error(exc: OSError, *, doing: str, path: Path, stage: str | None = None, run_dir: Path | None = None,
                 exit_code: int = EXIT_IO, hint: str | None = None) -> RunFolderError:
    """Turn an ``OSError`` into a one-paragraph ``RunFolderError``: what failed, the path, the stage, the fix
    (``hint``: a command's own; by default what `taskgalaxy run` needs)."""
    where = os.fsdecode(exc.filename) if exc.filename else path
    cause = _CAUSES.get(exc.errno, exc.strerror or str(exc))
    during = f"stage {stage!r}: " if stage else ""
    return RunFolderError(f"{during}could not {doing} ({where}): {cause} [errno {exc.errno}]. "
                          f"{hint or _hint(exc.errno, run_dir)}", exit_code)


def is_run_folder_problem(exc: BaseException, run_dir: Path) -> bool:
    """An ``OSError`` caused by the disk or the run folder (full, read-only, ...), not by a stage's own work."""
    if not isinstance(exc, OSError) or isinstance(exc, RunFolderError):
        return False
    if exc.errno in ENVIRONMENT_ERRNOS:
        return True
    if not exc.filename:
        return False
    inside, folder = os.path.abspath(os.fsdecode(exc.filename)), os.path.abspath(run_dir)
    return inside == folder or inside.startswith(folder.rstrip(os.sep) + os.sep)


def pseudo_filesystem(path: Path) -> tuple[str, str] | None:
    """``(fs type, mount point)`` when ``path`` (or the nearest folder of it that exists) lies on a kernel
    pseudo file system such as /proc or /sys, which cannot hold a run folder; None otherwise or when unknown."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    real = os.path.realpath(probe)
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None  # not Linux, or no /proc: nothing to tell
    best: tuple[str, str] | None = None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # "\040" is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[1])):
            best = (fields[2], point)
    return best if best and best[0] in PSEUDO_FILESYSTEMS else None


def refuse_pseudo_filesystem(run_dir: Path) -> None:
    found = pseudo_filesystem(run_dir)
    if found:
        fstype, point = found
        raise RunFolderError(
            f"the run folder {run_dir} would lie on the kernel's {fstype!r} pseudo file system (mounted at "
            f"{point}), which cannot hold files; nothing was run. Pass --run-dir (or set run.run_dir to) a "
            "folder on a real disk.", EXIT_UNUSABLE)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_mode(path: Path) -> Path:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (0600/0700) the permissions ``open``/``mkdir``
    would have given it: what an export or a push writes is for others to read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)
    return Path(path)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk, so a rename that follows never publishes a truncated file
    after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: some filesystems refuse fsync on a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. some network filesystems; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


# What every state.json has held since the first version: the readers (resume, status, export) need them.
STATE_KEYS = {"stage": str, "fingerprint": str, "shards_total": int}


def read_json(path: Path) -> Any | None:
    """The parsed file, None when it does not exist; ``CorruptFileError`` (naming it) when it does not parse,
    or when it is a ``state.json`` that parses but is no stage state (``[]``, ``{}``: see ``STATE_KEYS``) or
    a shard's stats record that is no object: every reader then takes the path a damaged file takes (the
    runner rebuilds or recomputes, ``status`` names the file and the fix) instead of a bare ``TypeError``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        problem = f"it is not valid JSON ({type(exc).__name__}: {exc})"
        raise CorruptFileError(_corrupt_message(Path(path), problem)) from None
    path = Path(path)
    if path.name == STATE_FILE and (problem := _not_a_state(value)):
        raise CorruptFileError(_corrupt_message(path, problem))
    if path.parent.name == "stats" and path.name.startswith("shard-") and not isinstance(value, dict):
        raise CorruptFileError(_corrupt_message(path, f"it holds {json.dumps(value)[:40]}, not a shard's stats "
                                                      "(an object)"))
    return value


def _not_a_state(value: Any) -> str | None:
    """Why a parsed ``state.json`` is no stage state, or None when it is one."""
    if not isinstance(value, dict):
        return f"it holds {json.dumps(value)[:40]}, not a stage state (an object with {', '.join(STATE_KEYS)})"
    missing = [key for key in STATE_KEYS if key not in value]
    if missing:
        return f"it parses but lacks {', '.join(missing)}, which every stage state holds"
    wrong = [f"{key}={value[key]!r}" for key, kind in STATE_KEYS.items()
             if not isinstance(value[key], kind) or isinstance(value[key], bool)]
    if not wrong and value["shards_total"] < 0:
        wrong = [f"shards_total={value['shards_total']!r}"]
    return f"it parses but holds {', '.join(wrong)}, which no stage state does" if wrong else None


def _corrupt_message(path: Path, problem: str) -> str:
    stage = stage_of(path)
    during = f"stage {stage!r}: " if stage else ""
    if path.name == STATE_FILE:
        fix = ("Rerun `taskgalaxy run` with the same config: it rebuilds this file from the per-shard stats "
               "(and says so if it cannot); `status`, `export` and `push` read the stage again once it is rebuilt.")
    elif path.parent.name == "stats":
        fix = ("Delete it and rerun `taskgalaxy run` with the same config: the shard it describes is then "
               "recomputed (what it had paid is no longer known).")
    else:
        fix = "Move it aside and rerun the stage that writes it (`taskgalaxy run CONFIG --stages STAGE`)."
    return f"{during}{path} is damaged: {problem}. {fix}"


def stage_dir_name(index: int, name: str) -> str:
    return f"{index:02d}_{name}"


def find_stage_dir(run_dir: Path, name: str) -> Path | None:
    matches = sorted(p for p in run_dir.glob(f"[0-9][0-9]_{name}") if p.is_dir())
    return matches[0] if matches else None


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def remove_temporaries(folder: Path) -> int:
    """Delete leftovers of an interrupted write; returns how many were removed."""
    removed = 0
    if folder.exists():
        # ours (.tmp-*), and the temporary files `Dataset.map` writes beside its cache file (tmpXXXXXXXX)
        leftovers = [*folder.rglob(f"{TMP_PREFIX}*"), *(p for p in folder.glob("tmp*") if p.is_file())]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def clear_stage_dir(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
