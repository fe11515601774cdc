"""The coverage pass of the match stage: every leaf task type gets at least ``coverage_min`` candidate images.

Plain top-k matching lets each image choose; a leaf that no image ranks in its top-k never reaches the
filter, however many images would fit it. The pass turns the question round (reverse top-k): for a leaf
under the minimum, the images most similar to *it* get it as an extra candidate, best first, skipping images
that already hold it or already took ``coverage_max_extra`` additions. That needs every image's embedding at
once, so with the pass on the match stage embeds all images first (one pass over the images table, saved in
``coverage/embeddings.npz`` of its folder so a resume does not redo it) and each shard then only looks up its
images' candidates. Deterministic: leaves in taxonomy order, images by score then position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    """[n, dim] unit vectors (rows of unreadable images are zero) and the errors by position; cached."""
    if cache.exists():
        with np.load(cache, allow_pickle=False) as saved:
            if list(saved["ids"]) == list(image_ids):
                errors = {int(i): ImageError(str(r), str(d)) for i, r, d in
                          zip(saved["error_pos"], saved["error_reason"], saved["error_detail"])}
                return saved["vectors"], errors
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
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(".tmp-" + cache.name)
    with open(tmp, "wb") as handle:
        np.savez(handle, ids=np.array(list(image_ids), dtype=str), vectors=vectors,
                 error_pos=np.array(sorted(errors), dtype=np.int64),
                 error_reason=np.array([errors[i].reason for i in sorted(errors)], dtype=str),
                 error_detail=np.array([errors[i].detail for i in sorted(errors)], dtype=str))
    tmp.replace(cache)
    return vectors, errors


def _topk(a: np.ndarray, b: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from processors.clip.topk import topk_cosine

    with torch.inference_mode():
        scores, index = topk_cosine(torch.from_numpy(a), torch.from_numpy(b), k, chunk)
    return scores.numpy(), index.numpy()


def plan_coverage(image_ids: Sequence[str], vectors: np.ndarray, errors: dict, bank, *, top_k: int,
                  minimum: int, max_extra: int, chunk: int = 4096) -> CoveragePlan:
    """Top-k per image plus the reverse top-k additions, from embeddings already computed."""
    good = [i for i in range(len(image_ids)) if i not in errors]
    plan = CoveragePlan({}, {image_ids[i]: e for i, e in errors.items()})
    if not good:
        return plan
    emb, texts = vectors[good], bank.vectors.astype(np.float32)
    scores, index = _topk(emb, texts, top_k, chunk)
    holds = [set(row.tolist()) for row in index]
    counts = np.bincount(index.ravel(), minlength=len(bank.paths))
    extras: list[list[tuple[float, int]]] = [[] for _ in good]
    short = [t for t in range(len(bank.paths)) if counts[t] < minimum]
    if short:
        # Look deep enough to skip images that already hold the leaf or are full.
        depth = min(len(good), minimum + top_k + max_extra)
        rscores, rindex = _topk(texts[short], emb, depth, chunk)
        for row, task in enumerate(short):
            need = minimum - counts[task]
            for score, image in zip(rscores[row], rindex[row]):
                if need == 0:
                    break
                if task in holds[image] or len(extras[image]) >= max_extra:
                    continue
                holds[image].add(task)
                extras[image].append((float(score), task))
                need -= 1
                plan.added += 1
            if need:
                plan.leaves_short.append(bank.paths[task])
            else:
                plan.leaves_raised += 1
    for pos, i in enumerate(good):
        chosen = [(float(s), int(t)) for s, t in zip(scores[pos], index[pos])] + sorted(extras[pos], key=lambda x: -x[0])
        plan.candidates[image_ids[i]] = [
            {"task_type": bank.paths[t], "task_id": bank.task_ids[t], "score": s} for s, t in chosen]
    logger.info("match coverage pass: %d leaves raised to %d candidates with %d additions; %d leaves still short "
                "(fewer usable images than asked)", plan.leaves_raised, minimum, plan.added, len(plan.leaves_short))
    return plan
