"""Task-type texts, their CLIP embeddings, and the on-disk cache that makes embedding them a one-off.

The text CLIP sees for a task type is built from its path by ``task_text`` (template versioned by
``TEXT_TEMPLATE_VERSION``). Embeddings are L2-normalised *per vector* (each row has norm 1) in float32: the
released code normalised along the other axis (per embedding dimension across all task types), which makes
the "similarity" depend on every other task type in the list and is not a cosine.

Cache files live in ``<cache_dir>/clip_text/<key>.npy`` where the key hashes the model, the weights, the
precision, the template version and the exact ordered (task_id, text) list, so any change re-embeds and an
unchanged taxonomy never does, across runs and processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from builder.ids import fingerprint

if TYPE_CHECKING:
    import torch

    from processors.clip.models import LoadedClip

logger = logging.getLogger(__name__)

TEXT_TEMPLATE_VERSION = "v1"
SEPARATOR = "~"


def task_text(path: str) -> str:
    """``"OCR~Scene text~Street sign reading"`` -> ``"Street sign reading (OCR / Scene text)"``.

    The leaf name leads because CLIP's text tower weighs early tokens most and truncates at its context
    length; the ancestors disambiguate leaves that share a name under different parents.
    """
    parts = [p.strip() for p in path.split(SEPARATOR) if p.strip()]
    if not parts:
        raise ValueError(f"empty task path {path!r}")
    if len(parts) == 1:
        return parts[0]
    return f"{parts[-1]} ({' / '.join(parts[:-1])})"


def leaf_mask(paths: Sequence[str]) -> list[bool]:
    """True for every path that is no other path's ancestor (the taxonomy's task types proper)."""
    prefixes = set()
    for path in paths:
        parts = path.split(SEPARATOR)
        for depth in range(1, len(parts)):
            prefixes.add(SEPARATOR.join(parts[:depth]))
    return [path not in prefixes for path in paths]


@dataclass
class TextBank:
    """The embedded task types, row i of ``vectors`` belonging to ``task_ids[i]`` / ``paths[i]``."""

    key: str
    task_ids: list[str]
    paths: list[str]
    vectors: np.ndarray  # float32 [n_tasks, dim], each row of unit norm
    source: str  # "computed" | "disk": where this bank came from (tests and logs)


def encode_texts(clip: "LoadedClip", texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Embed ``texts`` in batches; returns float32 [n, dim] rows of unit L2 norm."""
    import torch

    chunks = []
    with torch.inference_mode(), clip.autocast():
        for start in range(0, len(texts), batch_size):
            tokens = clip.tokenizer(list(texts[start : start + batch_size])).to(clip.device)
            chunks.append(normalize_rows(clip.model.encode_text(tokens)).cpu())
    if not chunks:
        raise ValueError("no task types to embed")
    return torch.cat(chunks).numpy()


def normalize_rows(vectors: "torch.Tensor") -> "torch.Tensor":
    """float32 copy with every row (one embedding) scaled to unit L2 norm: ``dim=-1``, not ``dim=0``."""
    import torch

    vectors = vectors.float()
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def bank_key(clip: "LoadedClip", task_ids: Sequence[str], texts: Sequence[str]) -> str:
    """Cache key: model, weights, precision, template version and a hash of the exact ordered task list."""
    content = hashlib.sha256()
    for task_id, text in zip(task_ids, texts, strict=True):
        content.update(f"{task_id}\x1f{text}\x1e".encode("utf-8"))
    return fingerprint(
        "clip-text", clip.name, clip.pretrained, clip.precision, TEXT_TEMPLATE_VERSION, content.hexdigest()
    )


def load_or_embed(
    clip: "LoadedClip",
    task_ids: Sequence[str],
    paths: Sequence[str],
    cache_dir: Path,
    batch_size: int,
    current: TextBank | None = None,
) -> TextBank:
    """The bank for these task types: ``current`` when it already is, else read from ``cache_dir`` when
    embedded before, else embed and store."""
    texts = [task_text(p) for p in paths]
    key = bank_key(clip, task_ids, texts)
    if current is not None and current.key == key:
        return current
    folder = Path(cache_dir) / "clip_text"
    file = folder / f"{key}.npy"
    if file.exists():
        vectors = np.load(file, mmap_mode=None)
        if vectors.shape[0] == len(texts):
            logger.info("CLIP text embeddings for %d task types read from %s", len(texts), file)
            return TextBank(key, list(task_ids), list(paths), vectors, "disk")
        logger.warning("ignoring %s: %d rows for %d task types", file, vectors.shape[0], len(texts))
    logger.info("embedding %d task types with %s", len(texts), clip.name)
    vectors = encode_texts(clip, texts, batch_size)
    _save(folder, key, vectors, {"model": clip.name, "pretrained": clip.pretrained, "precision": clip.precision,
                                 "template": TEXT_TEMPLATE_VERSION, "tasks": len(texts)})
    return TextBank(key, list(task_ids), list(paths), vectors, "computed")


def _save(folder: Path, key: str, vectors: np.ndarray, meta: dict) -> None:
    """Write the array then its metadata, each to a temporary name renamed into place (never half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}-{key}.npy"
    np.save(tmp, vectors)
    tmp.replace(folder / f"{key}.npy")
    meta_tmp = folder / f".tmp-{os.getpid()}-{key}.json"
    meta_tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    meta_tmp.replace(folder / f"{key}.json")
