"""Get the bytes behind reference rows: read a file, take a dataset cell, download a URL, draw a synthetic image.

Two phases so the stage can parallelise safely: ``prefetch`` runs in the calling thread and does what must
not run in worker threads or is better done for the whole batch at once (all URLs of the batch in one event
loop; dataset cells); ``read`` runs in a thread pool (file reads, synthetic drawing). Both return ``Blob``s:
bytes, or a reason code (``image_missing``, ``path_escape``, ``image_not_regular_file``, ``image_too_large``,
``image_unreadable``, ``download_*``) with a detail naming the file or URL.

Files are read only when they are regular files (``loaders.images.paths.read_regular_file``): a FIFO, socket,
device or folder under an image name — or a symlink to one — fails with ``image_not_regular_file`` before it
is opened, so no worker can wait forever for a writer that never comes, and no read is longer than
``limits.max_bytes``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loaders.images.download import DownloadConfig, fetch_urls
from loaders.images.hub import HubCellError, cell_bytes, open_hub_dataset
from loaders.images.paths import (
    FileTooLargeError,
    NotRegularFileError,
    PathEscapeError,
    read_regular_file,
    safe_join,
)
from loaders.images.sources import HubSource, SyntheticSource
from loaders.images.synthetic import synthetic_image

logger = logging.getLogger(__name__)


@dataclass
class Blob:
    data: bytes | None = None
    reason: str | None = None
    detail: str = ""


class Fetcher:
    """Bytes for the rows of one stage; holds opened Hub datasets for the life of one shard."""

    def __init__(self, sources: dict, roots: dict[str, Path], download: DownloadConfig, max_bytes: int):
        self.sources = sources  # source name -> source config
        self.roots = roots  # root name -> folder
        self.download = download
        self.max_bytes = max_bytes
        self._datasets: dict[str, object] = {}

    def prefetch(self, rows: list[dict], resumed: dict[str, Path]) -> dict[str, Blob]:
        """Blobs for URL and Hub rows (``resumed``: ref -> file already stored by an interrupted pass)."""
        blobs: dict[str, Blob] = {}
        pending = []
        for row in rows:
            if row["kind"] == "url":
                if row["ref"] in resumed:
                    blobs[row["ref"]] = self._read_file(resumed[row["ref"]])
                else:
                    pending.append(row)
            elif row["kind"] == "hub":
                blobs[row["ref"]] = self._hub_blob(row)
        if pending:
            for row, got in zip(pending, fetch_urls([r["locator"] for r in pending], self.download)):
                blobs[row["ref"]] = Blob(got.data) if got.reason is None else Blob(None, got.reason, got.detail)
        return blobs

    def read(self, row: dict, prefetched: dict[str, Blob]) -> Blob:
        """The blob of one row (thread-safe)."""
        if row["ref"] in prefetched:
            return prefetched[row["ref"]]
        if row["kind"] == "folder":
            try:
                file = safe_join(self.roots[row["source"]], row["locator"])
            except PathEscapeError as exc:
                return Blob(None, "path_escape", str(exc))
            return self._read_file(file)
        if row["kind"] == "synthetic":
            source: SyntheticSource = self.sources[row["source"]]
            return Blob(synthetic_image(source.seed, int(row["locator"]), tuple(source.size)))
        raise ValueError(f"row {row['ref']!r} has unknown kind {row['kind']!r}")

    def _read_file(self, file: Path) -> Blob:
        return read_file_blob(file, self.max_bytes)

    def _hub_blob(self, row: dict) -> Blob:
        source: HubSource = self.sources[row["source"]]
        if source.source_name not in self._datasets:
            self._datasets[source.source_name] = open_hub_dataset(source)
        dataset = self._datasets[source.source_name]
        try:
            return Blob(cell_bytes(dataset[int(row["locator"])][source.image_column], source, self.max_bytes))
        except HubCellError as exc:
            return Blob(None, exc.reason, f"{row['ref']}: {exc}")


def read_file_blob(file: Path, max_bytes: int) -> Blob:
    """The bytes of an image file, or the reason they cannot be had; never blocks on a non-regular file."""
    try:
        return Blob(read_regular_file(file, max_bytes))
    except FileNotFoundError:
        return Blob(None, "image_missing", f"{file} no longer exists; restore it or rerun with a fresh listing")
    except NotRegularFileError as exc:
        return Blob(None, "image_not_regular_file", f"{exc}; remove it or move it out of the image folder")
    except FileTooLargeError as exc:
        return Blob(None, "image_too_large", f"{exc} by limits.max_bytes")
    except OSError as exc:  # permissions, I/O errors, a link loop
        return Blob(None, "image_unreadable", f"{file}: {type(exc).__name__}: {exc}")
