"""Images held in a `datasets` dataset: a Hub repo id or a local folder (``save_to_disk`` output or data files).

The image column is read undecoded (``Image(decode=False)``): each cell is ``{"bytes", "path"}``; a column of
raw ``bytes`` or of file paths works too. Paths are resolved against the local dataset folder and must stay
inside it. The dataset is opened lazily, once per shard; Hub datasets come from the HF cache (``HF_HOME``),
so a run with ``HF_HUB_OFFLINE=1`` works once the dataset was downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loaders.images.paths import FileTooLargeError, NotRegularFileError, PathEscapeError, read_regular_file, safe_join
from loaders.images.sources import HubSource


class HubCellError(ValueError):
    """A cell of the image column that holds no usable image reference; ``reason`` is the failure code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def open_hub_dataset(source: HubSource):
    """The source's split as a `Dataset`, with its image column left undecoded."""
    import datasets

    if source.path is not None:
        path = Path(source.path)
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(str(path), name=source.config, split=source.split)
    else:
        ds = datasets.load_dataset(source.dataset, name=source.config, split=source.split, revision=source.revision)
    if source.image_column not in ds.column_names:
        raise ValueError(
            f"source {source.source_name!r}: no column {source.image_column!r} (columns: {ds.column_names}); "
            "set image_column"
        )
    if isinstance(ds.features[source.image_column], datasets.Image):
        ds = ds.cast_column(source.image_column, datasets.Image(decode=False))
    return ds.select_columns([source.image_column])


def cell_bytes(cell: Any, source: HubSource, max_bytes: int | None = None) -> bytes:
    """The image bytes behind one cell of the image column; raises ``HubCellError`` with a reason code.

    A cell naming a file reads at most ``max_bytes`` of it, and only if it is a regular file (never a FIFO).
    """
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        return _read_path(cell, source, max_bytes)
    raise HubCellError("image_missing", f"the {source.image_column!r} cell holds neither bytes nor a path")


def _read_path(path: str, source: HubSource, max_bytes: int | None) -> bytes:
    if source.path is None:
        raise HubCellError("image_missing", f"cell refers to file {path!r} but the dataset has no local folder")
    base = Path(source.path)
    try:
        file = safe_join(base, Path(path).relative_to(base) if Path(path).is_absolute() else path)
    except (PathEscapeError, ValueError) as exc:
        raise HubCellError("path_escape", f"cell path {path!r} lies outside {base}: {exc}") from None
    try:
        return read_regular_file(file, max_bytes)
    except FileNotFoundError:
        raise HubCellError("image_missing", f"{file} does not exist") from None
    except NotRegularFileError as exc:
        raise HubCellError("image_not_regular_file", str(exc)) from None
    except FileTooLargeError as exc:
        raise HubCellError("image_too_large", f"{exc} by limits.max_bytes") from None
    except OSError as exc:
        raise HubCellError("image_unreadable", f"{file}: {type(exc).__name__}: {exc}") from None
