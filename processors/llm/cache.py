"""The persistent request cache: one SQLite file (WAL mode) shared by every stage and process of a run.

It maps a request's cache key (``processors.llm.prepare``) to the reply the API gave: text, finish reason,
usage and logprobs, never the request itself, the URL, the key or any header. Only replies that passed the
request's ``parse`` are stored, so a hit is always usable. Writes are buffered and committed every
``FLUSH_EVERY`` replies or ``FLUSH_SECONDS``; a crash loses at most that window of answers.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FLUSH_EVERY = 64
FLUSH_SECONDS = 0.5
_SELECT_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    reply TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class RequestCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Other processes (Ray workers, a second stage) may write the same file: wait for their locks.
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._pending: list[tuple[str, str, float]] = []
        self._last_flush = time.monotonic()

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), _SELECT_CHUNK):
            chunk = keys[start:start + _SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, reply in self._db.execute(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk):
                found[key] = json.loads(reply)
        return found

    def put(self, key: str, reply: dict[str, Any]) -> None:
        self._pending.append((key, json.dumps(reply, ensure_ascii=False), time.time()))
        if len(self._pending) >= FLUSH_EVERY or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", self._pending)
            logger.debug("request cache: committed %d replies", len(self._pending))
            self._pending.clear()
        self._last_flush = time.monotonic()

    def __len__(self) -> int:
        self.flush()
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.flush()
        self._db.close()

    def __enter__(self) -> "RequestCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
