"""Images' wire encodings kept on disk, so a later stage (or a resumed run) that sends an image again reads its
encoding instead of decoding, resizing and encoding it once more.

The in-memory cache in ``processors.llm.images`` holds ~256 MB of data URLs: enough for every image of a small
run, but a stage that walks 10,000 images in the order the stage before it did finds none of them there (measured
in ``scripts/bench_scale.py``: qa costs 0.83 s per 1,000 rows at 2,000 images and 3.1 s at 10,000, all of it
encoding again). This store is the second tier, under the run's cache folder, switched on by
``llm.image_store_gb`` (off by default: it costs disk, about the size of the run's images at the referees'
sides). It holds the encoded JPEG/PNG bytes (base64 is made again on reading: a quarter less disk, ~30 us a
image), one file per (content hash, longest side, format), under a folder named after the Pillow that wrote
them, so an upgraded Pillow encodes anew rather than mixing its bytes with the old one's.

It only ever saves work, never changes a request: a miss encodes as before; what is read back is the bytes the
same encoder wrote for the same content. Full (``image_store_gb`` reached, or less than ``FREE_RESERVE`` left on
the disk) it keeps what it has and stores nothing more (a scan-resistant choice: the first images stay, rather
than each new one evicting the one the next stage will want first); a write that fails (a full or read-only
disk) switches it off for the process with one warning, and no request fails because of it. Writes are atomic
(a temporary file renamed into place), so a kill leaves no half-written encoding; several processes (Ray
workers) may share the folder, each counting what it writes against the limit it read at its start.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

ENCODED_STORE_FOLDER = "encoded-images"  # under the run's cache folder
FREE_RESERVE = 2 * 1024**3  # never fill the disk the run writes its results to: stop storing below 2 GB free
MAX_ENCODING_BYTES = 64 * 1024**2  # an encoding read back is at most this large (one is ~40-300 KB)
MIMES = {"jpeg": "image/jpeg", "png": "image/png"}


def pillow_version() -> str:
    from PIL import __version__

    return __version__


class EncodedStore:
    """Encoded images under ``folder`` (one folder per Pillow version), at most ``max_bytes`` of them."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder) / f"pillow-{pillow_version()}"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes in the folder, counted at the first write
        self._full = False
        self._broken = False
        self.hits = self.misses = self.writes = 0

    def _path(self, key: tuple[str, int, str]) -> Path:
        digest, side, fmt = key
        if fmt not in MIMES or not digest.isalnum():  # keys are hex digests; anything else is not ours to store
            raise ValueError(f"not an encoding key: {key!r}")
        return self.folder / digest[:2] / f"{digest}.{int(side)}.{fmt}"

    def get(self, key: tuple[str, int, str], url_type=str) -> str | None:
        """The data URL stored under ``key``, or None."""
        if self._broken:
            return None
        from loaders.images.paths import read_regular_file

        try:  # bounded, and a FIFO or folder in an encoding's place is a miss, never a hang
            data = read_regular_file(self._path(key), MAX_ENCODING_BYTES)
        except (OSError, ValueError):
            data = b""
        if not data:
            self.misses += 1
            return None
        self.hits += 1
        return url_type(f"data:{MIMES[key[2]]};base64,{base64.b64encode(data).decode('ascii')}")

    def put(self, key: tuple[str, int, str], url: str) -> None:
        """Store the data URL ``url`` (made by ``images._encode``) under ``key``, if there is room."""
        if self._broken or self._full:
            return
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
            path = self._path(key)
        except (ValueError, IndexError):
            return
        with self._lock:
            if self._used is None:
                self._used = _bytes_under(self.folder)
            if self._used + len(data) > self.max_bytes:
                self._stop(f"it holds {self._used / 1024**3:.2f} GB, llm.image_store_gb's limit")
                return
            self._used += len(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(path.parent).free < FREE_RESERVE + len(data):
                self._stop(f"less than {FREE_RESERVE // 1024**3} GB is left on its disk")
                return
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            self.writes += 1
        except OSError as exc:
            self._broken = True
            logger.warning("image store %s: writing an encoding failed (%s); the run goes on without storing "
                           "encodings in this process (images are encoded as they are needed)", self.folder, exc)

    def _stop(self, why: str) -> None:
        if not self._full:
            self._full = True
            logger.info("image store %s is full (%s): it keeps what it has and stores no more", self.folder, why)


def _bytes_under(folder: Path) -> int:
    total = 0
    if not folder.is_dir():
        return 0
    with os.scandir(folder) as shards:
        for shard in shards:
            if shard.is_dir(follow_symlinks=False):
                with os.scandir(shard.path) as files:
                    total += sum(f.stat(follow_symlinks=False).st_size for f in files
                                 if f.is_file(follow_symlinks=False))
    return total
