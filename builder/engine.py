"""Executing one shard: the local engine runs the stage's batch function with ``Dataset.map``.

The engine only turns (input shard, batch function) into a raw Arrow table of output rows plus in-band
failures; the runner decides file names, resume and accounting. ``Dataset.map`` writes its cache file under a
temporary name chosen by us, with the fingerprint we pass (closures holding clients or models do not hash).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa

from builder.rows import INBAND_COLUMNS
from builder.stage import BatchFn

logger = logging.getLogger(__name__)


def inband_features(features: datasets.Features) -> datasets.Features:
    """The stage's output features plus the runner's in-band columns (all strings)."""
    extended = datasets.Features(dict(features))
    for column in INBAND_COLUMNS:
        extended[column] = datasets.Value("string")
    return extended


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


class LocalEngine:
    """One process: ``Dataset.map`` over the shard, batch by batch, on this machine."""

    name = "local"

    def run_shard(
        self,
        shard: datasets.Dataset,
        fn: BatchFn,
        *,
        features: datasets.Features,
        batch_size: int | None,
        fingerprint: str,
        tmp_path: Path,
        on_batch: Callable[[int], None],
    ) -> pa.Table:
        full = inband_features(features)
        if len(shard) == 0:
            return full.arrow_schema.empty_table()

        def counted(batch: dict[str, list]) -> dict[str, list]:
            result = fn(batch)
            on_batch(len(next(iter(batch.values()))) if batch else 0)
            return result

        mapped = shard.map(
            counted,
            batched=True,
            batch_size=batch_size or len(shard),
            remove_columns=shard.column_names,
            features=full,
            new_fingerprint=fingerprint,
            cache_file_name=str(tmp_path),
            load_from_cache_file=False,
            desc=None,
        )
        return mapped.data.table
