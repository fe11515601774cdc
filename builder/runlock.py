"""The run lock: one process at a time on a run folder (``run.lock``, an ``flock`` that dies with its process,
so a killed run never blocks), and the probe ``status --watch`` uses to tell whether a run is active."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from builder.runfolder import (EXIT_UNUSABLE, LOCK_FILE, RunFolderError, folder_error,
                               refuse_pseudo_filesystem)


class RunLockedError(RuntimeError):
    """Another process is running on the same run folder."""


_HELD_LOCKS: set[int] = set()  # the lock fds this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, a decode pool): close the run locks it inherited. A flock is
    held while *any* descriptor of it is open, so a worker that outlives a killed run by a few seconds would
    otherwise keep the folder locked against the resume."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


LOCK_WAIT_S = 1.0  # a busy lock is retried this long: a watcher's probe holds it (shared) for a moment only


def _flock_exclusive(fd: int, wait_s: float = LOCK_WAIT_S) -> None:
    """``LOCK_EX`` on ``fd`` without blocking for ever: a lock still busy after ``wait_s`` raises (EAGAIN)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def run_lock_held(run_dir: Path) -> bool:
    """Whether a process holds the run folder's lock now (``status --watch``). Probes the flock itself, never
    the pid written in the file: after a SIGKILL that pid may be reused, or be another namespace's. The probe
    takes a shared lock and releases it at once (``RunLock.acquire`` retries past such a moment)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file: no run ever held the folder (or it is unreadable: nothing to tell)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on a run folder. ``flock`` dies with its process (and is not inherited by the
    processes it forks), so a killed run never blocks."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        run_dir = self.path.parent
        refuse_pseudo_filesystem(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # never inherited by exec
        except OSError as exc:
            raise self._unusable(exc) from None
        try:
            _flock_exclusive(fd)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"run folder {self.path.parent} is in use by {holder}; wait for that run to finish "
                    "(or stop it), or pass a different --run-dir"
                ) from None
            raise self._unusable(exc) from None
        try:  # who holds it, for the message a second run gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        except OSError as exc:  # a disk too full for 40 bytes cannot take a shard either: stop now
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise self._unusable(exc) from None
        self._fd = fd
        _HELD_LOCKS.add(fd)
        return self

    def _unusable(self, exc: OSError) -> RunFolderError:
        error = folder_error(exc, doing="create the run lock before any stage ran", path=self.path,
                             run_dir=self.path.parent, exit_code=EXIT_UNUSABLE)
        return RunFolderError(f"{error} Nothing was run.", EXIT_UNUSABLE)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCKS.discard(self._fd)
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
