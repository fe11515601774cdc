"""Turn the images stage's sources into reference rows, and name the folder behind every root.

One row per file / dataset row / URL / synthetic index, columns ``ref, source, kind, locator, url``:

=========== =============================== ==================================================
kind        ref                             locator
=========== =============================== ==================================================
folder      ``<source>/<relative path>``    path relative to the source root (also recipes)
hub         ``<source>#<row index>``        row index in the split
url         ``<source>#<line index>``       the URL (also in ``url``)
synthetic   ``<source>#<index>``            index in the synthetic set
=========== =============================== ==================================================

Rows come in config order (sources as listed, each sorted), so the first of two identical images is always
the same one. Listing a recipe downloads and unpacks it first (resumable); see ``loaders.images.recipes``.

Nothing is dropped without a count: ``list_sources_with_report`` also returns, per source, how many references
it gave, how many its ``limit`` cut, and for folders and recipes how many entries were passed over and why
(hidden files, hidden or linked folders, other endings; see ``loaders.images.folder``). The images stage
writes that report to its ``stats.json`` (shown by ``taskgalaxy status --json``).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from loaders.images.download import DownloadConfig
from loaders.images.folder import FolderListing, scan_images
from loaders.images.paths import STORE_ROOT, require_regular_file
from loaders.images.prepare import check_count, prepare_recipe, recipe_root
from loaders.images.recipes import RECIPES
from loaders.images.sources import (
    FolderSource,
    HubSource,
    RecipeSource,
    SyntheticSource,
    UrlListSource,
)

logger = logging.getLogger(__name__)

COLUMNS = ("ref", "source", "kind", "locator", "url")


def list_sources(sources, run_dir: Path, download: DownloadConfig) -> dict[str, list]:
    """All reference rows of ``sources``, as columns."""
    return list_sources_with_report(sources, run_dir, download)[0]


def list_sources_with_report(sources, run_dir: Path, download: DownloadConfig) -> tuple[dict[str, list], dict]:
    """All reference rows of ``sources`` as columns, and per source name what was listed and what was passed over."""
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    report: dict[str, dict] = {}
    for source in sources:
        rows, skipped = _list_one(source, run_dir, download)
        listed = len(rows)
        if source.limit is not None:
            rows = rows[: source.limit]
        report[source.source_name] = {"type": source.type, "references": len(rows), "cut_by_limit": listed - len(rows),
                                      "skipped": dict(sorted(skipped.items()))}
        note = _skip_note(listed - len(rows), skipped)
        logger.info("source %s: %d references%s", source.source_name, len(rows), note)
        for row in rows:
            for column, value in zip(COLUMNS, row):
                columns[column].append(value)
    return columns, report


_SKIP_WORDS = {  # reason -> (one, many)
    "hidden_file": ("hidden file", "hidden files"),
    "hidden_folder": ("hidden folder (not searched)", "hidden folders (not searched)"),
    "linked_folder": ("linked folder (not followed)", "linked folders (not followed)"),
    "other_extension": ("file with another ending", "files with other endings"),
    "unreadable_folder": ("unreadable folder", "unreadable folders"),
}


def _skip_note(cut: int, skipped: dict[str, int]) -> str:
    parts = [f"{n} {_SKIP_WORDS.get(reason, (reason, reason))[n != 1]}" for reason, n in sorted(skipped.items()) if n]
    if cut:
        parts.append(f"{cut} cut by its limit")
    return f" (not taken: {', '.join(parts)})" if parts else ""


def _list_one(source, run_dir: Path, download: DownloadConfig) -> tuple[list[tuple], dict[str, int]]:
    name = source.source_name
    if isinstance(source, FolderSource):
        found = scan_images(Path(source.root), source.extensions)
        return [(f"{name}/{rel}", name, "folder", rel, None) for rel in found.files], found.skipped
    if isinstance(source, RecipeSource):
        root = recipe_root(source, run_dir)
        found = FolderListing()
        for folder in prepare_recipe(source, run_dir, download):
            part = scan_images(folder, RECIPES[source.recipe].extensions)
            part.files = [(folder / rel).relative_to(root).as_posix() for rel in part.files]
            found.merge(part)
        check_count(source.recipe, len(found.files))
        return [(f"{name}/{rel}", name, "folder", rel, None) for rel in sorted(found.files)], found.skipped
    return _list_generated(source, name), {}


def _list_generated(source, name: str) -> list[tuple]:
    """Rows of sources that are not folders: dataset rows, URL lines, synthetic indices."""
    if isinstance(source, HubSource):
        from loaders.images.hub import open_hub_dataset

        count = len(open_hub_dataset(source))
        return [(f"{name}#{i}", name, "hub", str(i), None) for i in range(count)]
    if isinstance(source, UrlListSource):
        return [(f"{name}#{i}", name, "url", url, url) for i, url in enumerate(read_url_list(Path(source.file), source.column))]
    if isinstance(source, SyntheticSource):
        return [(f"{name}#{i:05d}", name, "synthetic", str(i), None) for i in range(source.count)]
    raise TypeError(f"unknown source type {type(source).__name__}")


def read_url_list(path: Path, column: str = "url") -> list[str]:
    """URLs from .txt (one per line; blank lines and '#' comments skipped), .csv, .jsonl or .parquet."""
    require_regular_file(path)  # a FIFO named urls.txt would block the listing forever
    suffix = path.suffix.lower()
    if suffix in (".txt", ".lst", ".list", ""):
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        urls = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            _need_column(column, reader.fieldnames or [], path)
            urls = [(row[column] or "").strip() for row in reader]
    elif suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        _need_column(column, rows[0].keys() if rows else [column], path)
        urls = [str(row.get(column) or "").strip() for row in rows]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        _need_column(column, table.column_names, path)
        urls = [str(u or "").strip() for u in table.column(column).to_pylist()]
    else:
        raise ValueError(f"{path}: URL lists must be .txt, .csv, .tsv, .jsonl or .parquet")
    return urls


def _need_column(column: str, names, path: Path) -> None:
    if column not in names:
        raise ValueError(f"{path} has no column {column!r} (columns: {list(names)}); set the source's 'column'")


def source_roots(sources, run_dir: Path, store_dir: Path) -> dict[str, Path]:
    """Root name -> folder for every root a row ``path`` may name (see ``loaders.images.paths``)."""
    roots = {STORE_ROOT: store_dir}
    for source in sources:
        if isinstance(source, FolderSource):
            roots[source.source_name] = Path(source.root)
        elif isinstance(source, RecipeSource):
            roots[source.source_name] = recipe_root(source, run_dir)
    return roots
