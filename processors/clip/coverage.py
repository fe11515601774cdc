"""The coverage pass of the match stage: every leaf task type gets at least ``coverage_min`` candidate images.

Plain top-k matching lets each image choose; a leaf that no image ranks in its top-k never reaches the
filter, however many images would fit it. The pass turns the question round (reverse top-k): for a leaf
under the minimum, the images most similar to *it* get it as an extra candidate, best first, skipping images
that already hold it or already took ``coverage_max_extra`` additions, as deep down the ranking as it takes.
That needs every image's embedding at once, so with the pass on the match stage embeds all images first (one pass over the images table, saved in
``coverage/embeddings.npz`` of its folder so a resume does not redo it) and each shard then only looks up its
images' candidates. Deterministic: leaves in taxonomy order, images by score then position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from processors.clip.images import ImageError

logger = logging.getLogger(__name__)


@dataclass
class CoveragePlan:
    candidates: dict[str, list[dict]]  # image_id -> top-k candidates, then the pass's additions
    errors: dict[str, ImageError]  # image_id -> why it has no embedding
    added: int = 0
    leaves_raised: int = 0
    leaves_short: list[str] = field(default_factory=list)  # leaves still under the minimum (too few images)


def embed_images(matcher, image_ids: Sequence[str], paths: Sequence[Path], cache: Path) -> tuple[np.ndarray, dict]:
    """[n, dim] unit vectors (rows of unreadable images are zero) and the errors by position; cached in ``cache``.

    Computed once per cache file: concurrent processes (Ray actors of one stage) wait for the first one's file
    instead of embedding every image again, and the file appears under its name only when whole."""
    from processors.shared_files import computed_once, write_atomic

    def read(path: Path):
        with np.load(path, allow_pickle=False) as saved:
            if list(saved["ids"]) != list(image_ids):
                return None
            errors = {int(i): ImageError(str(r), str(d)) for i, r, d in
                      zip(saved["error_pos"], saved["error_reason"], saved["error_detail"])}
            return saved["vectors"], errors

    def compute():
        vectors, errors = None, {}
        for batch in matcher.iter_batches(paths):
            errors.update(batch.errors)
            if batch.pixels is None:
                continue
            encoded = matcher.encode_images(batch.pixels).float().cpu().numpy()
            if vectors is None:
                vectors = np.zeros((len(paths), encoded.shape[1]), dtype=np.float32)
            vectors[batch.indices] = encoded
        if vectors is None:
            vectors = np.zeros((len(paths), 1), dtype=np.float32)
        return vectors, errors

    def write(path: Path, value) -> None:
        vectors, errors = value
        write_atomic(path, lambda handle: np.savez(
            handle, ids=np.array(list(image_ids), dtype=str), vectors=vectors,
            error_pos=np.array(sorted(errors), dtype=np.int64),
            error_reason=np.array([errors[i].reason for i in sorted(errors)], dtype=str),
            error_detail=np.array([errors[i].detail for i in sorted(errors)], dtype=str)))

    return computed_once(Path(cache), read, compute, write)


def topk_rows(a: np.ndarray, b: np.ndarray, k: int, chunk: int = 4096, device=None,
              rows: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The top-``k`` rows of ``b`` for each row of ``a`` by dot product, on ``device`` (the matcher's: a GPU
    when it has one), as ``(first row, scores, indices)`` per block of ``rows`` rows of ``a``. Memory stays
    bounded whatever the sizes: ``b`` is scored ``chunk`` rows at a time against one block (``rows`` x
    ``chunk`` floats) and merged into the running top-k, which gives exactly the global top-k."""
    import torch

    from processors.clip.topk import topk_cosine

    device = torch.device(device or "cpu")
    rows = rows or chunk
    with torch.inference_mode():
        bank = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).to(device)
        for start in range(0, len(a), rows):
            block = torch.from_numpy(np.ascontiguousarray(a[start:start + rows], dtype=np.float32)).to(device)
            scores, index = topk_cosine(block, bank, k, chunk)
            yield start, scores.float().cpu().numpy(), index.cpu().numpy()


def _topk(a: np.ndarray, b: np.ndarray, k: int, chunk: int, device=None) -> tuple[np.ndarray, np.ndarray]:
    parts = list(topk_rows(a, b, k, chunk, device))
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


# Scores held at once by the reverse search (leaves x depth): a block of leaves is searched together.
REVERSE_BUDGET = 1 << 24


def plan_coverage(image_ids: Sequence[str], vectors: np.ndarray, errors: dict, bank, *, top_k: int,
                  minimum: int, max_extra: int, chunk: int = 4096, device=None) -> CoveragePlan:
    """Top-k per image plus the reverse top-k additions, from embeddings already computed.

    A short leaf scans the images by similarity to it, best first, skipping those that hold it already or
    are full (``max_extra`` additions). When the images it scanned run out before its need is met, the search
    goes deeper (twice as deep, for the leaves still short, in taxonomy order) until the need is met or every
    image was scanned: only then is the leaf reported short. An image skipped once stays unusable for that
    leaf (it holds it, or it is full, and both only grow), so a deeper round resumes where the last stopped."""
    good = [i for i in range(len(image_ids)) if i not in errors]
    plan = CoveragePlan({}, {image_ids[i]: e for i, e in errors.items()})
    if not good:
        return plan
    emb, texts = vectors[good], bank.vectors.astype(np.float32)
    scores, index = _topk(emb, texts, top_k, chunk, device)
    holds = [set(row.tolist()) for row in index]
    counts = np.bincount(index.ravel(), minlength=len(bank.paths))
    extras: list[list[tuple[float, int]]] = [[] for _ in good]
    need = {t: int(minimum - counts[t]) for t in range(len(bank.paths)) if counts[t] < minimum}
    scanned = dict.fromkeys(need, 0)
    raised = 0
    depth = min(len(good), minimum + top_k + max_extra)
    while need:
        leaves = list(need)  # taxonomy order
        rows = max(1, min(chunk, REVERSE_BUDGET // max(depth, 1)))
        for start, rscores, rindex in topk_rows(texts[leaves], emb, depth, chunk, device, rows=rows):
            for row, task in enumerate(leaves[start:start + len(rscores)]):
                for score, image in zip(rscores[row][scanned[task]:], rindex[row][scanned[task]:]):
                    if not need[task]:
                        break
                    scanned[task] += 1
                    if task in holds[image] or len(extras[image]) >= max_extra:
                        continue
                    holds[image].add(task)
                    extras[image].append((float(score), int(task)))
                    need[task] -= 1
                    plan.added += 1
                if not need[task]:
                    del need[task]
                    raised += 1
        if depth >= len(good):
            break
        depth = min(len(good), depth * 2)
    plan.leaves_raised = raised
    plan.leaves_short = [bank.paths[t] for t in need]
    for pos, i in enumerate(good):
        chosen = [(float(s), int(t)) for s, t in zip(scores[pos], index[pos])] + sorted(extras[pos], key=lambda x: -x[0])
        plan.candidates[image_ids[i]] = [
            {"task_type": bank.paths[t], "task_id": bank.task_ids[t], "score": s} for s, t in chosen]
    room = sum(len(e) < max_extra for e in extras)
    logger.info("match coverage pass: %d leaves raised to %d candidates with %d additions; %d leaves still short "
                "(every image scanned: it holds the leaf or is full; %d images had room)", plan.leaves_raised,
                minimum, plan.added, len(plan.leaves_short), room)
    return plan
