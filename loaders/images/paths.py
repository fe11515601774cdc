"""Image roots: how a row's ``path`` becomes a file, and the guarantee that it never leaves its root.

A row of the images stage stores ``path = "<root name>/<path inside that root>"`` (POSIX separators):

- ``store/<id[:2]>/<image_id>.<ext>`` for every image the stage wrote itself (URL downloads, Hub datasets
  holding bytes, synthetic images), content-addressed under the store folder (default ``<run>/images``);
- ``<source name>/<relative path>`` for folder and recipe sources, whose files stay where they are.

The stage writes the mapping root name -> folder to ``<run>/<NN>_images/image_roots.json`` (folders inside
the run folder are stored relative to it, so a moved run folder keeps working). Downstream::

    from loaders.images.paths import resolve_image_path
    file = resolve_image_path(ctx.run_dir, row["path"])   # -> absolute Path, checked to stay in its root

``image_roots.json`` is a file in the run folder like any other, so what leaves the machine (``export``,
``push``) does not take its word alone: ``trusted_roots`` accepts a root only when it lies inside the run
folder (the default store, recipe downloads) or is a folder that the images stage's own config, as recorded in
its ``state.json``, names — otherwise an edited file pointing a root at ``/etc`` would export ``/etc/passwd``.

Reading: image files are opened only through ``read_regular_file`` / ``open_regular_file``, which refuse a
FIFO, socket, device or folder (or a symlink to one) with ``NotRegularFileError`` before opening it, open with
``O_NONBLOCK`` and check the open fd again (the path may be swapped in between), and read at most the bytes
the caller allows: no read of an image waits for a writer or runs without a bound.
"""

from __future__ import annotations

import json
import os
import stat
from functools import lru_cache
from pathlib import Path, PurePosixPath

from builder.runfolder import EXIT_DATA, STATE_FILE, RunFolderError, read_json

ROOTS_FILE = "image_roots.json"
STORE_ROOT = "store"


class PathEscapeError(ValueError):
    """A relative path that would leave its root (``..``, absolute, or through a symlink)."""


class UntrustedRootError(PathEscapeError, RunFolderError):
    """An image root in ``image_roots.json`` that the run's config does not vouch for (see ``trusted_roots``)."""

    def __init__(self, message: str):
        PathEscapeError.__init__(self, message)
        self.exit_code = EXIT_DATA


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


# ------------------------------------------------------------------------------- regular files only
class NotRegularFileError(OSError):
    """A FIFO, socket, device or folder where an image file was expected: opening or reading one can block
    forever (a FIFO waits for a writer) or never end (``/dev/zero``), so it is refused before it is opened."""


class FileTooLargeError(OSError):
    """A file with more bytes than the caller accepts; the rest is never read."""


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, in words: 'a named pipe (FIFO)', 'a socket', 'a regular file'..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def require_regular_file(path: str | os.PathLike) -> os.stat_result:
    """The ``stat`` of ``path`` (symlinks followed) if it is a regular file; else ``NotRegularFileError``.

    Only metadata is read (``lstat``/``stat`` never open the file), so this is safe on any path.
    """
    link = os.lstat(path)
    target = os.stat(path) if stat.S_ISLNK(link.st_mode) else link
    if not stat.S_ISREG(target.st_mode):
        via = "a symlink to " if stat.S_ISLNK(link.st_mode) else ""
        raise NotRegularFileError(f"{path} is {via}{file_kind(target.st_mode)}, not a regular file; refused "
                                  "without opening it (reading one can block forever)")
    return target


def open_regular_file(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """An fd open for reading on ``path`` and its ``fstat``, refusing anything but a regular file.

    Checked twice: before opening (``require_regular_file``: a device is never opened, since opening some has
    side effects) and on the open fd, because the path may have been swapped for a FIFO in between.
    ``O_NONBLOCK`` makes that swapped-in FIFO return at once instead of waiting for a writer; for a regular
    file it changes nothing.
    """
    require_regular_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise NotRegularFileError(f"{path} became {file_kind(opened.st_mode)} while being opened; refused")
    except BaseException:
        os.close(fd)
        raise
    return fd, opened


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` of them (``FileTooLargeError`` beyond that).

    Raises ``NotRegularFileError`` for FIFOs, sockets, devices and folders (and symlinks to them) without
    blocking, ``FileNotFoundError`` for a missing file and other ``OSError``s as they come. The read is
    bounded by ``max_bytes`` even if the file grows while it is read.
    """
    fd, info = open_regular_file(path)
    with os.fdopen(fd, "rb") as handle:
        if max_bytes is None:
            return handle.read()
        if info.st_size > max_bytes:
            raise FileTooLargeError(f"{path} has {info.st_size} bytes, above the {max_bytes} allowed")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"{path} grew while being read, past the {max_bytes} bytes allowed")
    return data


def trusted_roots(run_dir: str | os.PathLike) -> dict[str, Path]:
    """The run's image roots, each checked against what the run's config named (see the module docstring);
    ``UntrustedRootError`` names the first root that fails, and what to do."""
    run_dir = Path(run_dir)
    roots = load_roots(run_dir)
    path = roots_file(run_dir)
    named = _named_folders(path.parent / STATE_FILE)
    run_real = os.path.realpath(run_dir)
    for name, folder in sorted(roots.items()):
        real = os.path.realpath(folder)
        if (real != run_real and _is_inside(real, run_real)) or real in named:
            continue
        raise UntrustedRootError(
            f"image root {name!r} in {path} points to {real}, which is outside the run folder {run_dir} and is "
            f"no folder the images stage's config (recorded in {path.parent / STATE_FILE}) names: refusing to read "
            "images from it — the file was edited, or comes from another run. Rerun the images stage "
            "(`taskgalaxy run CONFIG --stages images`) to write it again from the config.")
    return roots


def require_under_roots(file: Path, roots: dict[str, Path]) -> Path:
    """``file`` itself when its real path lies under one of ``roots``; else ``PathEscapeError``."""
    real = os.path.realpath(file)
    if not any(_is_inside(real, _real_root(os.path.abspath(root))) for root in roots.values()):
        raise PathEscapeError(f"{file} resolves to {real}, outside every image root of the run ({sorted(roots)})")
    return Path(file)


def _is_inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _named_folders(state_path: Path) -> set[str]:
    """Real paths of every absolute path that the images stage's recorded config holds (folder roots, recipe
    roots, ``store_dir``...). Relative ones were resolved when the config was loaded, so none is missed."""
    state = read_json(state_path) or {}
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and os.path.isabs(value):
            found.add(os.path.realpath(value))

    walk(state.get("config") if isinstance(state, dict) else None)
    return found


def trusted_image_resolver(run_dir: Path):
    """``path -> file`` for the images of a run folder, refusing any file that does not lie under an image
    root the run's config named (``trusted_roots``): ``image_roots.json`` alone is a file in the run folder,
    not to be believed. What ``taskgalaxy export`` and ``push`` read images through."""
    roots = load_roots(run_dir)
    trusted = trusted_roots(run_dir)
    return lambda path: require_under_roots(resolve_image_path(run_dir, path, roots), trusted)
