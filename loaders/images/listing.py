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
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from loaders.images.folder import list_images
from loaders.images.paths import STORE_ROOT
from loaders.images.recipes import RECIPES, check_count, prepare_recipe, recipe_root
from loaders.images.sources import (
    DownloadConfig,
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
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    for source in sources:
        rows = _list_one(source, run_dir, download)
        if source.limit is not None:
            rows = rows[: source.limit]
        logger.info("source %s: %d references", source.source_name, len(rows))
        for row in rows:
            for column, value in zip(COLUMNS, row):
                columns[column].append(value)
    return columns


def _list_one(source, run_dir: Path, download: DownloadConfig) -> list[tuple]:
    name = source.source_name
    if isinstance(source, FolderSource):
        return [(f"{name}/{rel}", name, "folder", rel, None) for rel in list_images(Path(source.root), source.extensions)]
    if isinstance(source, RecipeSource):
        root = recipe_root(source, run_dir)
        rels = []
        for folder in prepare_recipe(source, run_dir, download):
            rels += [(folder / rel).relative_to(root).as_posix() for rel in list_images(folder, RECIPES[source.recipe].extensions)]
        check_count(source.recipe, len(rels))
        return [(f"{name}/{rel}", name, "folder", rel, None) for rel in sorted(rels)]
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
