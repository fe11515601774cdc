"""The persistent request cache: one SQLite file (WAL mode) shared by every stage and process of a run.

It maps a request's cache key (``processors.llm.prepare``) to the reply the API gave: text, finish reason,
usage and logprobs, never the request itself, the URL, the key or any header. Only replies that passed the
request's ``parse`` are stored, so a hit is always usable. Each reply is committed when it is put (WAL,
``synchronous=NORMAL``: ~20 us, durable against a killed process; a power loss may lose the last ones), and
the engine puts it before it counts the reply as paid, so no answer that was counted is ever asked again.

A damaged file (truncated, overwritten) is told when it is opened, or at the latest when a look-up meets the
damage: ``CacheDamagedError``, exit 65, naming the file and what to do. It is never repaired or set aside by
itself: it holds answers that were paid for.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from builder.runfolder import EXIT_DATA, RunFolderError

logger = logging.getLogger(__name__)

_SELECT_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    reply TEXT NOT NULL,
    created REAL NOT NULL
)
"""
# Paid replies that were unusable (did not parse, cut by max_tokens), by the call that asked: a resumed call
# counts them against each request's retry budget instead of paying for all of its attempts again.
_UNUSABLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS unusable (
    call TEXT NOT NULL,
    key TEXT NOT NULL,
    reason TEXT NOT NULL,
    text TEXT NOT NULL,
    created REAL NOT NULL
)
"""
_UNUSABLE_INDEX = "CREATE INDEX IF NOT EXISTS unusable_by_call ON unusable (call, key)"


_OPENING = threading.Lock()
_CHECKED: set[tuple[int, int]] = set()  # (device, inode) of the cache files this process has checked whole
_CHECKING = threading.Lock()
_DAMAGE_CODES = (11, 26)  # SQLITE_CORRUPT ("database disk image is malformed"), SQLITE_NOTADB
SIDE_FILES = ("-wal", "-shm")  # SQLite's write-ahead log and its index: they belong to the file beside them


class CacheDamagedError(RunFolderError):
    """The request cache's file is damaged (truncated, overwritten): exit 65 with the file and what to do.

    The file is left as it is: it holds answers that were paid for, and only a person can decide to give
    them up (move it aside, asked again and paid again) or to restore a backup."""

    def __init__(self, path: Path, cause: object):
        path = Path(path)
        super().__init__(
            f"the request cache {path} is damaged ({cause}): SQLite cannot read it, so this run cannot tell which "
            "answers it has already paid for; the file was left as it is. Restore it from a backup, or move it "
            f"aside (e.g. `mv {path} {path}.damaged`) and rerun the same command: finished shards are kept, but "
            "every other answer it held is asked again and paid again. Either way take its "
            f"{path.name}{SIDE_FILES[0]} and {path.name}{SIDE_FILES[1]} files along where they exist: left beside a "
            "restored or new file they damage it again. `sqlite3 DAMAGED .recover | sqlite3 NEW` may save most of "
            "its answers into a new file to put in its place.", EXIT_DATA)
        self.path, self.cause = path, str(cause)

    def __reduce__(self):  # a shard's error travels pickled (Ray, process pools): rebuilt from what it names
        return type(self), (self.path, self.cause)


def is_damage(exc: BaseException) -> bool:
    """An SQLite error that says the file itself is damaged (not locked, not a full disk)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _DAMAGE_CODES
    return "malformed" in str(exc) or "not a database" in str(exc)


def _check_whole(db: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` once per file and process: damage in pages no look-up has touched yet (measured:
    60-80 ms for 100,000 replies, 46 MB; the open itself and SQLite's header check cost microseconds)."""
    try:
        info = path.stat()
    except OSError:
        return  # not on disk (yet): nothing to check
    with _CHECKING:
        if (info.st_dev, info.st_ino) in _CHECKED:
            return
        verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if verdict != "ok":
            raise CacheDamagedError(path, f"PRAGMA quick_check: {' '.join(str(verdict).split())[:200]}")
        _CHECKED.add((info.st_dev, info.st_ino))


@retry(retry=retry_if_exception(lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)),
       stop=stop_after_attempt(8), wait=wait_exponential(multiplier=0.05, max=2.0), reraise=True)
def _set_up(db: sqlite3.Connection) -> None:
    """WAL mode and the tables. Switching a new file to WAL takes an exclusive lock for which SQLite does not
    wait (its busy timeout does not apply): two processes opening the file at the same moment get "database
    is locked" at once, so it is retried."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(_SCHEMA)
    db.execute(_UNUSABLE_SCHEMA)
    db.execute(_UNUSABLE_INDEX)


class RequestCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Other processes (Ray workers, a second stage) may write the same file: wait for their locks.
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            with _OPENING:  # two shards of this process opening a new file at once (the other processes: below)
                _set_up(self._db)
            _check_whole(self._db, self.path)
        except BaseException as exc:
            self._db.close()
            if is_damage(exc):
                raise CacheDamagedError(self.path, exc) from exc
            raise
        self._warned = False

    def _read(self, sql: str, args: tuple | list = ()) -> list[tuple]:
        """Rows of a query; a damaged file raises ``CacheDamagedError`` (the look-up cannot be trusted)."""
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            if is_damage(exc):
                raise CacheDamagedError(self.path, exc) from exc
            raise

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), _SELECT_CHUNK):
            chunk = keys[start:start + _SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, reply in self._read(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk):
                found[key] = json.loads(reply)
        return found

    def put(self, key: str, reply: dict[str, Any]) -> None:
        """Commit one reply now (see ``put_many``)."""
        self.put_many([(key, reply)])

    def put_many(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Commit replies now, in one transaction. A write that fails (disk full, a locked file past the
        timeout) is logged once and skipped: the answers were paid for and are used; a resume would only ask
        them again."""
        now = time.time()
        rows = [(key, json.dumps(reply, ensure_ascii=False), now) for key, reply in items]
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", rows)
        except sqlite3.Error as exc:
            if not self._warned:
                # A damaged file too is only told here: stopping now would throw away answers already paid for
                # (they are used); the next look-up or open stops the run with the same message.
                why = CacheDamagedError(self.path, exc) if is_damage(exc) else exc
                logger.warning("request cache %s: could not store a reply (%s); replies not stored are asked "
                               "(and paid for) again if this run is resumed", self.path, why)
                self._warned = True

    def unusable(self, call: str, keys: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
        """(reason, text) of the unusable replies already paid for, per key, in the call ``call``."""
        wanted = set(keys)
        found: dict[str, list[tuple[str, str]]] = {}
        rows = self._read("SELECT key, reason, text FROM unusable WHERE call = ? ORDER BY created", (call,))
        for key, reason, text in rows:
            if key in wanted:
                found.setdefault(key, []).append((reason, text))
        return found

    def add_unusable(self, call: str, key: str, record: tuple[str, str]) -> None:
        try:
            self._db.execute("INSERT INTO unusable VALUES (?, ?, ?, ?, ?)", (call, key, *record, time.time()))
        except sqlite3.Error as exc:
            logger.warning("request cache %s: could not note an unusable reply (%s)", self.path, exc)

    def __len__(self) -> int:
        return self._read("SELECT COUNT(*) FROM replies")[0][0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "RequestCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
