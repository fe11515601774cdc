"""The images stage's dedup ledger: which ref first brought each image (exact, by content id) and, optionally,
which earlier image each new one nearly equals (perceptual, by 64-bit dHash).

A small SQLite file in the stage folder. Why it stays deterministic across shards, reruns and crashes:
rows are processed strictly in input order (shards run one after another, batches in order, rows in order
inside a batch), and the ledger commits once per batch — so what it holds is always a *prefix* of that
order. A rerun of an interrupted shard replays the same rows in the same order: rows already in the ledger
get their recorded answer back (``claim`` returns the same first ref; ``near`` the same representative), and
rows past the prefix see exactly the state they saw the first time. Consequence: this holds for the local
engine only; a parallel engine must partition by content id or dedup afterwards.

Near-duplicates: an image's hash is split into ``max_distance + 1`` bands; two hashes within
``max_distance`` bits agree on at least one band (pigeonhole), so candidates come from indexed band lookups
instead of a scan. Only representatives (images that are not themselves near-duplicates) are candidates.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

MAX_BANDS = 8
_SIGN = 1 << 63  # SQLite integers are signed 64-bit


def hamming(a: int, b: int) -> int:
    """How many bits two perceptual hashes differ in (``processors.image_validate.dhash`` makes them)."""
    return (a ^ b).bit_count()


def _bands(value: int, count: int) -> list[int]:
    width = 64 // count
    bands = []
    for i in range(count):
        bits = width if i < count - 1 else 64 - width * (count - 1)
        bands.append((value >> (i * width)) & ((1 << bits) - 1))
    return bands + [None] * (MAX_BANDS - count)


class Ledger:
    """Open per batch (``with Ledger(path) as ledger``); commits on a clean exit, rolls back on an error."""

    def __init__(self, path: Path, *, bands: int = 5):
        if not 1 <= bands <= MAX_BANDS:
            raise ValueError(f"bands must be 1..{MAX_BANDS}")
        self.bands = bands
        self.conn = sqlite3.connect(str(path), timeout=60)
        self.conn.execute("PRAGMA journal_mode=WAL")
        band_cols = ", ".join(f"b{i} INTEGER" for i in range(MAX_BANDS))
        self.conn.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS images (image_id TEXT PRIMARY KEY, ref TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS refs (ref TEXT PRIMARY KEY, image_id TEXT NOT NULL, path TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS phash (image_id TEXT PRIMARY KEY, hash INTEGER NOT NULL, near_of TEXT,
                distance INTEGER, {band_cols});
            """
            + "".join(f"CREATE INDEX IF NOT EXISTS phash_b{i} ON phash(b{i});" for i in range(MAX_BANDS))
        )

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.commit()
        else:
            self.conn.rollback()
        self.conn.close()

    def claim(self, image_id: str, ref: str, path: str) -> str:
        """Record that ``ref`` holds ``image_id``; return the ref that brought it first (``ref`` if new)."""
        self.conn.execute("INSERT OR IGNORE INTO images VALUES (?, ?)", (image_id, ref))
        self.conn.execute("INSERT OR IGNORE INTO refs VALUES (?, ?, ?)", (ref, image_id, path))
        return self.conn.execute("SELECT ref FROM images WHERE image_id = ?", (image_id,)).fetchone()[0]

    def stored_path(self, ref: str) -> str | None:
        """The row path recorded for ``ref`` by an earlier (interrupted) pass, if any: lets downloads resume."""
        row = self.conn.execute("SELECT path FROM refs WHERE ref = ?", (ref,)).fetchone()
        return row[0] if row else None

    def first_ref(self, image_id: str) -> str | None:
        row = self.conn.execute("SELECT ref FROM images WHERE image_id = ?", (image_id,)).fetchone()
        return row[0] if row else None

    def near(self, image_id: str, value: int, max_distance: int) -> tuple[str | None, int]:
        """The earliest representative within ``max_distance`` bits of ``value`` (or None), and the distance."""
        row = self.conn.execute("SELECT near_of, distance FROM phash WHERE image_id = ?", (image_id,)).fetchone()
        if row is not None:
            return row[0], row[1] or 0
        bands = _bands(value, self.bands)
        where = " OR ".join(f"b{i} = ?" for i in range(self.bands))
        candidates = self.conn.execute(
            f"SELECT image_id, hash FROM phash WHERE near_of IS NULL AND ({where}) ORDER BY rowid",
            bands[: self.bands],
        ).fetchall()
        best, distance = None, 0
        for other, other_hash in candidates:
            d = hamming(value, other_hash + _SIGN)
            if d <= max_distance:
                best, distance = other, d
                break
        self.conn.execute(
            f"INSERT INTO phash VALUES (?, ?, ?, ?, {', '.join('?' * MAX_BANDS)})",
            (image_id, value - _SIGN, best, distance, *bands),
        )
        return best, distance
