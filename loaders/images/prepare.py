"""Making a named recipe's images present under its root (``recipes.RECIPES`` says what a set is made of):
download the missing archives (resumable, checked), unpack each once, and check the count found."""

from __future__ import annotations

import logging
from pathlib import Path

from loaders.images.archives import ArchiveError, download_file, unpack
from loaders.images.download import DownloadConfig
from loaders.images.recipes import RECIPES
from loaders.images.sources import RecipeSource

logger = logging.getLogger(__name__)


def recipe_root(source: RecipeSource, run_dir: Path) -> Path:
    return Path(source.root) if source.root else run_dir / "sources" / source.recipe


def prepare_recipe(source: RecipeSource, run_dir: Path, download: DownloadConfig) -> list[Path]:
    """Make the set's images present under its root; return the folders to list. Raises ``ArchiveError``."""
    recipe = RECIPES[source.recipe]
    root = recipe_root(source, run_dir)
    dirs = [root / d for d in recipe.image_dirs]
    if recipe.manual:
        if not all(d.is_dir() for d in dirs):
            raise ArchiveError(f"recipe {recipe.name!r} needs a manual step: {recipe.manual.replace('<root>', str(root))}")
        return dirs
    for archive in recipe.archives:
        marker = root / f".unpacked-{archive.filename}"
        if marker.exists():
            continue
        if not source.download:
            raise ArchiveError(
                f"recipe {recipe.name!r}: {archive.filename} is not unpacked under {root} and download is off; "
                f"fetch {archive.url} and unzip it into {root}, or set download: true"
            )
        url = f"{source.mirror.rstrip('/')}/{archive.filename}" if source.mirror else archive.url
        path = download_file(url, root / ".downloads" / archive.filename, download, md5=archive.md5)
        logger.info("unpacking %s into %s", path, root)
        unpack(path, root)
        marker.write_text(f"{url}\n", encoding="utf-8")
        if not source.keep_archives:
            path.unlink()
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ArchiveError(f"recipe {recipe.name!r}: expected folders {missing} after unpacking; the layout changed?")
    return dirs


def check_count(recipe_name: str, found: int) -> None:
    expected = RECIPES[recipe_name].expected_count
    if expected is not None and found != expected:
        logger.warning("recipe %s: found %d images, the set's authors publish %d", recipe_name, found, expected)
