"""Image roots: how a row's ``path`` becomes a file, and the guarantee that it never leaves its root.

A row of the images stage stores ``path = "<root name>/<path inside that root>"`` (POSIX separators):

- ``store/<id[:2]>/<image_id>.<ext>`` for every image the stage wrote itself (URL downloads, Hub datasets
  holding bytes, synthetic images), content-addressed under the store folder (default ``<run>/images``);
- ``<source name>/<relative path>`` for folder and recipe sources, whose files stay where they are.

The stage writes the mapping root name -> folder to ``<run>/<NN>_images/image_roots.json`` (folders inside
the run folder are stored relative to it, so a moved run folder keeps working). Downstream::

    from loaders.images.paths import resolve_image_path
    file = resolve_image_path(ctx.run_dir, row["path"])   # -> absolute Path, checked to stay in its root
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path, PurePosixPath

ROOTS_FILE = "image_roots.json"
STORE_ROOT = "store"


class PathEscapeError(ValueError):
    """A relative path that would leave its root (``..``, absolute, or through a symlink)."""


def safe_join(root: Path, relative: str | os.PathLike, *, resolve_links: bool = True) -> Path:
    """``root / relative``, refusing absolute paths, ``..`` and (by default) symlinks that lead outside."""
    text = str(relative).replace("\\", "/")
    parts = [part for part in text.split("/") if part not in ("", ".")]  # "./a", "a//b", "a/" are plain
    if text.startswith("/") or ".." in parts or not parts:
        raise PathEscapeError(f"{str(relative)!r} is not a plain relative path inside {root}")
    joined = Path(root, *parts)
    if resolve_links:
        # One realpath per file (an lstat per component: the only way to see a symlink that leads out); the
        # root's own is cached. Runs once per image per stage, so it is kept to string operations.
        real_root = _real_root(os.path.abspath(root))
        real = os.path.realpath(joined)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise PathEscapeError(f"{relative!s} resolves to {real}, outside its root {real_root}")
    return joined


@lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def store_relpath(image_id: str, ext: str) -> str:
    """Where the stage stores an image it wrote itself, relative to the store folder."""
    return f"{image_id[:2]}/{image_id}.{ext}"


def row_path(root_name: str, relative: str) -> str:
    return f"{root_name}/{PurePosixPath(relative).as_posix()}"


def roots_file(run_dir: Path) -> Path | None:
    matches = sorted(Path(run_dir).glob(f"[0-9][0-9]_images/{ROOTS_FILE}"))
    return matches[0] if matches else None


def write_roots(path: Path, run_dir: Path, roots: dict[str, Path]) -> None:
    """Write the root mapping atomically; folders inside ``run_dir`` are stored relative to it."""
    from builder.runfolder import atomic_write_json

    run_real = Path(os.path.realpath(run_dir))
    data = {}
    for name, folder in sorted(roots.items()):
        real = Path(os.path.realpath(folder))
        data[name] = {"relative_to_run": str(real.relative_to(run_real))} if run_real in real.parents else {
            "absolute": str(real)
        }
    atomic_write_json(path, data)


@lru_cache(maxsize=16)
def _load_roots(path: str, mtime_ns: int) -> dict[str, Path]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    run_dir = Path(path).parent.parent
    return {
        name: (run_dir / spec["relative_to_run"]) if "relative_to_run" in spec else Path(spec["absolute"])
        for name, spec in data.items()
    }


def load_roots(run_dir: Path) -> dict[str, Path]:
    """The root mapping of a run folder's images stage."""
    path = roots_file(run_dir)
    if path is None:
        raise FileNotFoundError(
            f"{run_dir} has no images stage output ({ROOTS_FILE}); run the 'images' stage first"
        )
    return _load_roots(str(path), path.stat().st_mtime_ns)


def resolve_image_path(run_dir: str | os.PathLike, path: str, roots: dict[str, Path] | None = None) -> Path:
    """The file behind an images-stage row's ``path``; raises ``PathEscapeError`` if it would leave its root."""
    roots = roots if roots is not None else load_roots(Path(run_dir))
    root_name, _, rest = str(path).partition("/")
    if root_name not in roots or not rest:
        raise PathEscapeError(f"image path {path!r} names no known image root (known: {sorted(roots)})")
    return safe_join(roots[root_name], rest)
