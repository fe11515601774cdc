"""Files that several processes of one run may write at once (Ray workers, two shards of one stage).

A file such a computation leaves in a stage folder (the coverage pass's embeddings, the final stage's plan)
is written under a temporary name no other process can pick (pid + random) and renamed into place, so a
reader sees the old file or the new one, never half of either; ``computed_once`` adds an advisory lock so
the first process computes and the others wait and read what it wrote instead of computing it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def unique_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no concurrent writer shares: ``.tmp-<pid>-<random>-<name>``."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(6)}-{path.name}")


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into a unique temporary file beside ``path``, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock (``flock``) held for the block: one process at a time. Where the file system refuses
    locks (some network mounts), the block runs unlocked with a warning: the writes stay atomic, only the
    work may be done twice."""
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as exc:
            logger.warning("no lock on %s (%s): a concurrent process may compute the same file", lock_path, exc)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def computed_once(path: Path, read: Callable[[Path], T | None], compute: Callable[[], T],
                  write: Callable[[Path, T], None]) -> T:
    """The content of ``path``: read when present and valid (``read`` returns None otherwise), else computed
    and written by the first process to get the lock, while the others wait and then read it."""
    path = Path(path)
    found = read(path) if path.exists() else None
    if found is not None:
        return found
    with exclusive(path.with_name(f".{path.name}.lock")):
        found = read(path) if path.exists() else None
        if found is not None:
            return found
        value = compute()
        write(path, value)
        return value
