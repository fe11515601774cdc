"""Writing ``tasktype.txt``: one leaf task type per line, names joined by ``~``, UTF-8, no BOM, ``\\n`` ends.

The same format the paper released, so the file can be imported back (``read_tasktypes``) or diffed
against the original list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from builder.runfolder import atomic_write_bytes
from loaders.taxonomy.names import join_path

TASKTYPE_FILE = "tasktype.txt"


def format_tasktypes(paths: Iterable[Sequence[str]]) -> str:
    return "".join(join_path(parts) + "\n" for parts in paths)


def write_tasktypes(path: str | Path, paths: Iterable[Sequence[str]]) -> int:
    """Write leaf paths atomically; returns the number of lines written."""
    text = format_tasktypes(paths)
    atomic_write_bytes(Path(path), text.encode("utf-8"))
    return text.count("\n")
