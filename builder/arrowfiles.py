"""Reading and writing the `datasets` Arrow files of a run folder (IPC streams, memory-mapped on read)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa


def read_arrow_table(path: Path) -> pa.Table:
    """Read a `datasets` Arrow file (IPC stream) memory-mapped."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def write_arrow_table(path: Path, table: pa.Table, features: datasets.Features | None = None) -> None:
    """Write ``table`` as a `datasets` Arrow file that ``Dataset.from_file`` reads with its features."""
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(path=str(path), features=features)
    try:
        writer.write_table(table)
        writer.finalize()
    finally:
        writer.close()
