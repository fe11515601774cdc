"""The run folder on disk: stage folders, atomic writes, the run lock and each stage's state.json.

Layout (design.md §4)::

    <run_dir>/
      run.lock                  held (flock) while a run is active; released by the OS even on SIGKILL
      config.yaml               the validated config this run used (no secrets: only env var *names*)
      cache/                    request cache, embedding caches
      NN_<stage>/
        state.json              fingerprint, shard list, counts, usage; rewritten atomically
        input.arrow             source stages only: the listed input rows, frozen so shards stay stable
        shard-00000.arrow       output rows of shard 0 (a `datasets` Arrow file); present = shard finished
        failures/shard-00000.arrow  rows (and items) of shard 0 that did not make it, with reason codes
        stats/shard-00000.json  per-shard counts and usage
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
LOCK_FILE = "run.lock"
TMP_PREFIX = ".tmp-"


class RunLockedError(RuntimeError):
    """Another process is running on the same run folder."""


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


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


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


class RunLock:
    """An exclusive lock on a run folder. ``flock`` dies with its process, so a killed run never blocks."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"run folder {self.path.parent} is in use by {holder}; wait for that run to finish "
                    "(or stop it), or pass a different --run-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
