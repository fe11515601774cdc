"""The CLIP near-copy check of decontamination (``near_threshold``): our images against the benchmark images.

Apart from ``decontam`` because it needs the match stage's CLIP model, and a GPU, when it is on, while the
pixel and perceptual-hash checks there need neither: ``decontam`` imports this module only when
``near_threshold`` is set, and torch and open_clip are imported here only when a check runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SIM_CHUNK = 4096  # rows of each side per similarity block


def clip_matches(rest: list[str], images: dict[str, Path], chosen: list[tuple[str, Path]], config,
                 ctx) -> dict[str, tuple[str, Path, float]]:
    """image_id -> (benchmark name, path, cosine) of its best CLIP match at or above ``near_threshold``."""
    from processors.clip.coverage import embed_images, topk_rows
    from processors.clip.shared import get_matcher, release_matchers

    matcher = get_matcher(ctx.settings.stages.match, ctx.cache_dir)
    folder, found = Path(ctx.stage_dir) / "decontam", {}
    try:
        ours, bad_ours = _our_vectors(matcher, rest, images, ctx, folder)
        theirs, bad = embed_images(matcher, [str(p) for _, p in chosen], [p for _, p in chosen],
                                   folder / "benchmarks.npz")
        good = [j for j in range(len(chosen)) if j not in bad]
        if not good:
            return found
        device = matcher.clip.device
        for start, scores, index in topk_rows(ours, theirs[good], 1, SIM_CHUNK, device):  # running best match
            for row in range(len(scores)):
                position = start + row
                score = float(scores[row, 0])
                if position not in bad_ours and score >= config.near_threshold:
                    found[rest[position]] = (*chosen[good[int(index[row, 0])]], score)
    finally:
        release_matchers()
    return found


def _our_vectors(matcher, ids: list[str], images: dict[str, Path], ctx, folder: Path):
    """Our images' CLIP vectors: the match stage's own where its coverage pass saved them under the same model,
    the rest embedded here. Returns (vectors [len(ids), dim], positions without a vector)."""
    import numpy as np

    from processors.clip.coverage import embed_images

    saved = _match_embeddings(ctx)
    vectors: dict[str, np.ndarray] = {}
    if saved is not None:
        position = {image_id: i for i, image_id in enumerate(saved["ids"])}
        for image_id in ids:
            i = position.get(image_id)
            if i is not None and i not in saved["errors"]:
                vectors[image_id] = saved["vectors"][i]
    missing = [i for i in ids if i not in vectors]
    bad: set[int] = set()
    if missing:
        fresh, errors = embed_images(matcher, missing, [images[i] for i in missing], folder / "images.npz")
        for k, image_id in enumerate(missing):
            if k not in errors:
                vectors[image_id] = fresh[k]
    logger.info("decontamination: %d of %d images' vectors reused from the match stage", len(ids) - len(missing),
                len(ids))
    dim = next((v.shape[0] for v in vectors.values()), 1)
    out = np.zeros((len(ids), dim), dtype=np.float32)
    for k, image_id in enumerate(ids):
        if image_id in vectors:
            out[k] = vectors[image_id]
        else:
            bad.add(k)
    return out, bad


def _match_embeddings(ctx) -> dict | None:
    """The coverage pass's saved embeddings, when the match stage ran with the model configured now."""
    import numpy as np

    from builder.outputs import stage_state

    try:
        folder, state = stage_state(Path(ctx.run_dir), "match")
    except Exception:  # noqa: BLE001 - no match stage in this run folder: embed here
        return None
    path = Path(folder) / "coverage" / "embeddings.npz"
    current = ctx.settings.stages.match
    ran = state.get("config") or {}
    if not path.exists() or ran.get("model") != current.model or ran.get("pretrained") != current.pretrained:
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {"ids": [str(i) for i in saved["ids"]], "vectors": saved["vectors"],
                    "errors": set(int(i) for i in saved["error_pos"])}
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("decontamination: the match stage's embeddings %s are unreadable (%s): embedding here",
                       path, exc)
        return None


__all__ = ["clip_matches"]
