"""Which URL refs of a batch already have their bytes in the image store, so a rerun after a crash does not
download them again.

One small JSON file per batch, named by the batch's refs (the frozen input and the fixed batch size make them
the same on every run), written by the worker that downloaded them and read by whichever worker runs that
batch again. Files, not the images stage's duplicate ledger: the workers may run on other nodes, and only the
runner's process writes the ledger. The stage removes the folder once every shard is committed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from builder.runfolder import atomic_write_json
from loaders.images.paths import STORE_ROOT, PathEscapeError, safe_join

DOWNLOADS_DIR = "downloads"  # in the images stage's folder


class DownloadJournal:
    def __init__(self, folder: Path, store: Path):
        self.folder, self.store = folder, store

    def _file(self, rows: list[dict]) -> Path:
        digest = hashlib.sha256("\n".join(row["ref"] for row in rows).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.json"

    def stored(self, rows: list[dict]) -> dict[str, Path]:
        """The refs of this batch whose bytes an earlier pass stored, and their files (still present)."""
        try:
            recorded = json.loads(self._file(rows).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        found = {}
        for ref, path in recorded.items() if isinstance(recorded, dict) else ():
            if isinstance(path, str) and path.startswith(f"{STORE_ROOT}/"):
                try:
                    file = safe_join(self.store, path.split("/", 1)[1])
                except PathEscapeError:
                    continue
                if file.is_file():
                    found[ref] = file
        return found

    def record(self, rows: list[dict], stored: dict[str, str]) -> None:
        """``stored``: ref -> row path (``store/...``) of the URL refs of this batch now in the store."""
        if stored:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._file(rows), stored)
