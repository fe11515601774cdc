"""Images' wire encodings kept on disk, so a later stage (or a resumed run) that sends an image again reads its
encoding instead of decoding, resizing and encoding it once more.

The in-memory cache in ``processors.llm.images`` holds ~256 MB of data URLs: enough for every image of a small
run, but a stage that walks 10,000 images in the order the stage before it did finds none of them there (measured
in ``scripts/bench_scale.py``: qa costs 0.96 s per 1,000 rows at 2,000 images and 2.5 s at 10,000, most of it
encoding again). This store is the second tier, under the run's cache folder, switched on by
``llm.image_store_gb`` (off by default: it costs disk, about the size of the run's images at the endpoints'
sides). It holds the encoded JPEG/PNG bytes (base64 is made again on reading: a quarter less disk, ~30 us an
image) in one SQLite file per Pillow version (and the JPEG and zlib libraries it was built with), so an
upgraded Pillow encodes anew rather than mixing its bytes with the old one's. One file, not a file per image: creating a file cost ~0.5 ms of kernel time here (measured),
an insert into SQLite's write-ahead log a tenth of that, and 825,000 files are a burden of their own.

It only ever saves work, never changes a request: a miss encodes as before; what is read back is the bytes the
same encoder wrote for the same content. Full (``image_store_gb`` reached, or less than ``FREE_RESERVE`` left on
the disk) it keeps what it has and stores no more (a scan-resistant choice: the first images stay, rather than
each new one evicting the one the next stage will want first). A store that cannot be opened or written (a full
or read-only disk, a damaged file) switches itself off for the process with one warning: no request fails
because of it. Several processes (Ray workers) may share the file: SQLite's lock orders their writes, a write
that would wait is skipped (it is a cache), and each process counts the file's size against the limit every
``DISK_CHECK_EVERY`` writes, so together they overshoot it by at most that many writes each.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

logger = logging.getLogger(__name__)

ENCODED_STORE_FOLDER = "encoded-images"  # under the run's cache folder
FREE_RESERVE = 2 * 1024**3  # never fill the disk the run writes its results to: stop storing below 2 GB free
DISK_CHECK_EVERY = 64  # writes between two looks at the disk's free space (a statvfs each)
FORMATS = ("jpeg", "png")
_SCHEMA = "CREATE TABLE IF NOT EXISTS encodings (key TEXT PRIMARY KEY, data BLOB NOT NULL)"


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


@retry(retry=retry_if_exception(lambda exc: isinstance(exc, sqlite3.OperationalError) and _locked(exc)),
       stop=stop_after_attempt(8), wait=wait_exponential(multiplier=0.05, max=1.0), reraise=True)
def _set_up(db: sqlite3.Connection) -> None:
    """WAL mode and the table. Switching a new file to WAL takes an exclusive lock SQLite does not wait for
    (its busy timeout does not apply): processes (Ray workers) opening the file at once get "database is
    locked" at once, so it is retried, as the request cache does (``processors.llm.cache``)."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last encodings, never damage the file
    db.execute(_SCHEMA)


def pillow_version() -> str:
    """Pillow's version and the JPEG and zlib libraries it was built with: what decides an encoding's bytes."""
    from PIL import __version__, features

    return f"{__version__}-jpeg{features.version_codec('jpg')}-zlib{features.version_codec('zlib')}"


def status_line(cache_dir: Path) -> str | None:
    """What ``taskgalaxy status`` says of the run's image store (``llm.image_store_gb``): its size on disk;
    None when the run has none."""
    folder = Path(cache_dir) / ENCODED_STORE_FOLDER
    try:
        files = [p for p in folder.iterdir() if p.name.endswith((".sqlite", ".sqlite-wal"))] if folder.is_dir() else []
        size = sum(p.stat().st_size for p in files)
    except OSError as exc:
        return f"image store: {folder} is unreadable ({exc.strerror or exc})"
    if not files:
        return None
    return (f"image store: {size / 1024**2:,.0f} MB of image encodings in {folder} (llm.image_store_gb; a cache: "
            "deleting it loses no answer)")


class EncodedStore:
    """Encoded images in ``folder``/pillow-<version>.sqlite, at most ``max_bytes`` of them."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"pillow-{pillow_version()}.sqlite"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # one connection, used by the encoding threads in turn
        self._db: sqlite3.Connection | None = None
        self._used = 0  # bytes of encodings in the file, counted when it is opened
        self._full = False
        self._broken = False
        self._closed = False
        self._writes_since_disk_check = 0
        self.hits = self.misses = self.writes = 0

    @staticmethod
    def _key(key: tuple[str, int, str]) -> str:
        digest, side, fmt = key
        if fmt not in FORMATS or not digest.isalnum():  # keys are hex digests; anything else is not ours
            raise ValueError(f"not an encoding key: {key!r}")
        return f"{digest}.{int(side)}.{fmt}"

    def get(self, key: tuple[str, int, str]) -> bytes | None:
        """The encoded image stored under ``key`` (JPEG or PNG bytes), or None."""
        try:
            name = self._key(key)
        except ValueError:
            return None
        with self._lock:
            db = self._open()
            if db is None:
                return None
            try:
                row = db.execute("SELECT data FROM encodings WHERE key = ?", (name,)).fetchone()
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    self._break("reading", exc)
                    return None
                row = None  # a writer in another process holds it: a miss
            except sqlite3.DatabaseError as exc:
                self._break("reading", exc)
                return None
            if not row or not row[0]:
                self.misses += 1
                return None
            self.hits += 1
        return bytes(row[0])

    def put(self, key: tuple[str, int, str], data: bytes) -> None:
        """Store ``data``, the encoded image of ``key`` (``images._encode_image``), if there is room."""
        if self._full or not data:
            return
        try:
            name = self._key(key)
        except ValueError:
            return
        with self._lock:
            db = self._open()
            if db is None or self._full:
                return
            if self._used + len(data) > self.max_bytes:
                self._stop(f"it holds {self._used / 1024**3:.2f} GB, llm.image_store_gb's limit")
                return
            self._writes_since_disk_check -= 1
            if self._writes_since_disk_check <= 0:
                self._writes_since_disk_check = DISK_CHECK_EVERY
                try:
                    free = shutil.disk_usage(self.folder).free
                    # Other processes (Ray workers) write the same file: its size counts what they stored, so
                    # together they overshoot the limit by at most DISK_CHECK_EVERY writes each.
                    self._used = max(self._used, self._file_bytes())
                except OSError as exc:
                    self._break("checking the disk of", exc)
                    return
                if self._used + len(data) > self.max_bytes:
                    self._stop(f"it holds {self._used / 1024**3:.2f} GB, llm.image_store_gb's limit")
                    return
                if free < FREE_RESERVE + DISK_CHECK_EVERY * len(data):
                    self._stop(f"less than {FREE_RESERVE // 1024**3} GB is left on its disk")
                    return
            try:
                added = db.execute("INSERT OR IGNORE INTO encodings (key, data) VALUES (?, ?)",
                                   (name, sqlite3.Binary(data))).rowcount
            except sqlite3.OperationalError as exc:
                if _locked(exc):
                    return  # another process is writing: this one is not stored, nothing else changes
                self._break("writing", exc)
                return
            except sqlite3.DatabaseError as exc:
                self._break("writing", exc)
                return
            if added:
                self._used += len(data)
                self.writes += 1

    def _open(self) -> sqlite3.Connection | None:
        """The connection (under ``_lock``), opened on first use; None when the store is off or closed."""
        if self._broken or self._closed:
            return None
        if self._db is not None:
            return self._db
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=0.05, isolation_level=None, check_same_thread=False)
            try:
                _set_up(db)
                self._used = int(db.execute("SELECT total(length(data)) FROM encodings").fetchone()[0])
            except BaseException:
                db.close()
                raise
        except sqlite3.OperationalError as exc:
            if _locked(exc):  # several processes opened it at once, and retrying did not get through: later
                return None
            self._break("opening", exc)
            return None
        except (OSError, sqlite3.Error) as exc:
            self._break("opening", exc)
            return None
        self._db = db
        return db

    def _file_bytes(self) -> int:
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _break(self, doing: str, exc: BaseException) -> None:
        self._broken = True
        if self._db is not None:
            self._db.close()
            self._db = None
        try:
            advice = self._advice(exc)
        except OSError:  # a folder on the way that cannot even be searched: the store still must not fail a request
            advice = f"Check that this process can write {self.folder}, or set llm.image_store_gb: 0."
        logger.warning("image store %s: %s it failed (%s); the run goes on without it in this process (images "
                       "are encoded as they are needed). %s", self.path, doing, exc, advice)

    def _advice(self, exc: BaseException) -> str:
        """What to do, by what failed: a damaged file is deleted; a folder that cannot be written is fixed."""
        damaged = isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)
        if damaged:  # "file is not a database", "database disk image is malformed"
            return f"The file is damaged: delete {self.path} (a cache of encodings; nothing else is lost)."
        existing = next((p for p in (self.folder, *self.folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            return f"{existing} is a file, not a folder: move it away, or set llm.image_store_gb: 0."
        return (f"Check that this process can write {self.folder} (permissions, a read-only or full disk), or set "
                "llm.image_store_gb: 0.")

    def _stop(self, why: str) -> None:
        if not self._full:
            self._full = True
            logger.info("image store %s is full (%s): it keeps what it has and stores no more", self.path, why)

    def close(self) -> None:
        """Close the file; the store is off from then on (a thread still holding it gets misses)."""
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None
