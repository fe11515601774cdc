"""Typed configs of the image sources, one model per ``type`` (their download settings: ``download.DownloadConfig``).

A source config only *describes* where images are; ``loaders.images.listing`` turns it into reference rows
and ``loaders.images.fetch`` reads the bytes behind a reference. Every source has a ``name`` (default derived
from it) that prefixes its refs and, for sources kept in place, names its image root (see ``paths``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pathlib import Path

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from builder.config import ConfigPath, ExistingPath
from loaders.images.paths import NotRegularFileError, require_regular_file

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
RESERVED_NAMES = {"store"}  # the root of every image the stage writes itself
DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def _must_be_folder(path: Path) -> Path:
    if not path.is_dir():  # os.walk of a file lists nothing: an empty source instead of an error
        raise ValueError(f"{path} is not a folder; a folder source's root must be a folder of images")
    return path


def _must_be_regular_file(path: Path) -> Path:
    try:
        require_regular_file(path)  # reading a FIFO named urls.txt would block the listing forever
    except NotRegularFileError as exc:
        raise ValueError(str(exc)) from None
    return path


ExistingFolder = Annotated[ExistingPath, AfterValidator(_must_be_folder)]
ExistingFile = Annotated[ExistingPath, AfterValidator(_must_be_regular_file)]


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, pattern=NAME_PATTERN, description="unique source name; prefixes refs and paths")
    limit: int | None = Field(None, ge=0, description="take only the first N references (after sorting)")

    def default_name(self) -> str:
        raise NotImplementedError

    @property
    def source_name(self) -> str:
        return self.name or _slug(self.default_name())


class FolderSource(_Source):
    """Image files under a folder, recursively, kept in place (``path`` = ``<name>/<path under root>``)."""

    type: Literal["folder"]
    root: ExistingFolder
    extensions: tuple[str, ...] = Field(DEFAULT_EXTENSIONS, description="file name endings taken (case-insensitive)")

    def default_name(self) -> str:
        return self.root.name or "folder"


class HubSource(_Source):
    """A `datasets` dataset: a Hub repo id (``dataset``) or a local folder (``path``: save_to_disk or files)."""

    type: Literal["hub"]
    dataset: str | None = Field(None, description="Hub repo id, e.g. 'lmms-lab/some-set'")
    path: ExistingPath | None = Field(None, description="a local dataset folder instead of a Hub repo id")
    config: str | None = None
    split: str = "train"
    image_column: str = "image"
    revision: str | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> "HubSource":
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of 'dataset' (a Hub repo id) or 'path' (a local dataset folder)")
        return self

    def default_name(self) -> str:
        return self.dataset.rsplit("/", 1)[-1] if self.dataset else self.path.name


class UrlListSource(_Source):
    """A list of image URLs in a .txt (one per line), .csv, .jsonl or .parquet file; bytes are downloaded."""

    type: Literal["urls"]
    file: ExistingFile
    column: str = Field("url", description="the URL column of a csv/jsonl/parquet file")

    def default_name(self) -> str:
        return self.file.stem


class RecipeSource(_Source):
    """One of the paper's image sets by name (see ``loaders.images.recipes.RECIPES``), downloaded if allowed."""

    type: Literal["recipe"]
    recipe: str
    root: ConfigPath | None = Field(None, description="where the set lives/unpacks; default <run>/sources/<recipe>")
    download: bool = Field(True, description="download and unpack missing archives (resumable)")
    mirror: str | None = Field(None, description="base URL replacing the official host: <mirror>/<archive name>")
    keep_archives: bool = Field(True, description="keep downloaded archives after unpacking")

    @model_validator(mode="after")
    def _known(self) -> "RecipeSource":
        from loaders.images.recipes import RECIPES

        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; known: {', '.join(sorted(RECIPES))}")
        return self

    def default_name(self) -> str:
        return self.recipe


class SyntheticSource(_Source):
    """Deterministic generated images (charts, tables, text, shapes, scenes): the offline demo's images."""

    type: Literal["synthetic"]
    count: int = Field(48, ge=0, le=100_000)
    seed: int = 0
    size: tuple[Annotated[int, Field(ge=96, le=4096)], Annotated[int, Field(ge=96, le=4096)]] = Field(
        (512, 384), description="width, height of every generated image"
    )

    def default_name(self) -> str:
        return "synthetic"


SourceConfig = Annotated[
    FolderSource | HubSource | UrlListSource | RecipeSource | SyntheticSource, Field(discriminator="type")
]


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return slug or "source"
