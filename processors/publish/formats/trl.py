"""TRL ``SFTTrainer`` (vision): Parquet under ``data/`` that ``datasets.load_dataset(DIR, split="train")`` reads,
with columns ``id``, ``messages`` and ``images``.

``messages`` is TRL's conversational shape: each turn's ``content`` a list of typed parts, the user turn's
``{"type": "image"}`` part first, then ``{"type": "text", "text": question}``; no ``<image>`` token in any
text (the processor's chat template places the model's own). ``images`` is a list of ``datasets.Image`` with
the bytes embedded, so the folder trains (and renders on the Hub) without the image files. The same table is
the ``trl`` config of ``taskgalaxy push`` (``dataset``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import datasets

from builder.runfolder import TMP_PREFIX
from processors.publish.formats.base import Format, OutFile

MAX_SHARD_BYTES = 500 * 1024 * 1024  # of embedded image bytes (and text) per Parquet file
MAX_SHARD_ROWS = 50_000  # and of rows
_text = datasets.Value("string")
FEATURES = datasets.Features({
    "id": _text,
    "messages": datasets.List({"role": _text, "content": datasets.List({"type": _text, "text": _text})}),
    "images": datasets.List(datasets.Image()),
})


def messages(sample) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": sample.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}]


def dataset(samples, cache_file: Path) -> datasets.Dataset:
    """The samples (their ``file`` resolved) as TRL's table, the image bytes embedded; the embedded table is
    written to ``cache_file``."""
    rows = {"id": [s.id for s in samples], "messages": [messages(s) for s in samples],
            "images": [[{"path": str(s.file), "bytes": None}] for s in samples]}
    return embed_files(datasets.Dataset.from_dict(rows, features=FEATURES), cache_file)


def embed_files(table: datasets.Dataset, cache_file: Path) -> datasets.Dataset:
    """``table`` with the files its ``Image`` columns point at read into them as bytes (written to
    ``cache_file``: the run folder is only read, and may be read-only)."""
    from datasets.table import embed_table_storage

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    return table.with_format("arrow").map(embed_table_storage, batched=True, cache_file_name=str(cache_file),
                                          load_from_cache_file=False).with_format(None)


def shard_count(table: datasets.Dataset) -> int:
    """Shards of at most ``MAX_SHARD_BYTES`` of table (the embedded images, mostly) and ``MAX_SHARD_ROWS`` rows."""
    rows = len(table)
    count = max(1, math.ceil(table.data.nbytes / MAX_SHARD_BYTES), math.ceil(rows / MAX_SHARD_ROWS))
    return max(1, min(count, rows))


def render(samples, context):
    """One ``OutFile`` per shard, each written by ``to_parquet`` straight to the handle of its staged file (the
    export writes it before asking for the next one): the table itself is a memory-mapped Arrow file beside the
    output, so no shard, and not the dataset, is ever held in memory whole."""
    scratch = next(p for p in context.out_dir.parents if p.exists())  # beside the output: big, not in /tmp
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}trl-", dir=scratch) as tmp:
        table = dataset(samples, Path(tmp) / "trl.arrow")
        shards = shard_count(table)
        for index in range(shards):
            shard = table.shard(shards, index, contiguous=True)
            yield OutFile(f"data/train-{index:05d}-of-{shards:05d}.parquet",
                          lambda handle, shard=shard: shard.to_parquet(handle), "a TRL Parquet file")
            del shard
        del table


FORMAT = Format("trl", "TRL SFTTrainer (load_dataset(DIR, split='train'))", "data", render, images=False,
                owns=("data/train-*.parquet",))
