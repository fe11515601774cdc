"""The match stage's coverage pass: every leaf gets at least m candidate images (reverse top-k)."""

from __future__ import annotations

from collections import Counter

import test_match_stage as base  # its toy taxonomy, images and runner helper
from test_match_stage import run_dir  # noqa: F401 - the fixture

from builder.outputs import load_stage_failures, load_stage_output
from processors.clip.config import ClipMatchConfig
from processors.stages.match import MatchStage

LEAVES = [p for p in base.TASK_PATHS if not any(q.startswith(p + "~") for q in base.TASK_PATHS)]


def test_every_leaf_gets_at_least_m_candidates(run_dir):  # noqa: F811
    _, states = base.run(run_dir, top_k=1, coverage_min=2, coverage_max_extra=2)
    output = load_stage_output(run_dir, "match")
    counts = Counter(c["task_type"] for row in output for c in row["candidates"])
    assert set(counts) == set(LEAVES) and min(counts.values()) >= 2
    for row in output:  # the image's own top-1 first, then at most 2 additions, never a leaf twice
        tasks = [c["task_type"] for c in row["candidates"]]
        assert 1 <= len(tasks) <= 3 and len(set(tasks)) == len(tasks)
    assert [f["reason"] for f in load_stage_failures(run_dir, "match")] == ["image_corrupt"]
    stats = states["match"]
    assert stats["totals"]["rows_out"] == 9


def test_the_pass_off_leaves_the_fingerprint_config_as_before():
    off = MatchStage().fingerprint_config(ClipMatchConfig(pretrained=None))
    assert "coverage_min" not in off and "coverage_max_extra" not in off
    on = MatchStage().fingerprint_config(ClipMatchConfig(pretrained=None, coverage_min=3))
    assert on["coverage_min"] == 3 and on["coverage_max_extra"] == 3


def _bank(n_leaves, dim, rng):
    import numpy as np
    from types import SimpleNamespace

    vectors = rng.normal(size=(n_leaves, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return SimpleNamespace(vectors=vectors, paths=[f"C~leaf{i:03d}" for i in range(n_leaves)],
                           task_ids=[f"t{i}" for i in range(n_leaves)])


def test_the_pass_searches_deeper_when_generic_images_saturate():
    """A few generic images are every leaf's nearest; with shallow search they fill up and later leaves
    stayed short (10 of 40) although 190 images had room. Now every leaf reaches m."""
    import numpy as np

    from processors.clip.coverage import plan_coverage

    rng = np.random.default_rng(0)
    dim, leaves, m, max_extra = 64, 40, 3, 2
    bank = _bank(leaves, dim, rng)
    bank.vectors[:] = np.eye(dim, dtype=np.float32)[:leaves]  # orthogonal leaves
    centre = bank.vectors.sum(axis=0)
    generic = np.stack([centre + 0.3 * rng.normal(size=dim) for _ in range(10)])  # near every leaf
    others = np.stack([np.eye(dim)[0] * 5 + 0.02 * rng.normal(size=dim) for _ in range(190)])  # all pick leaf 0
    vectors = np.concatenate([generic, others]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"img{i:03d}" for i in range(len(vectors))]
    plan = plan_coverage(ids, vectors, {}, bank, top_k=1, minimum=m, max_extra=max_extra, chunk=7)
    counts = Counter(c["task_type"] for cands in plan.candidates.values() for c in cands)
    assert plan.leaves_short == []
    assert min(counts[p] for p in bank.paths) >= m
    for cands in plan.candidates.values():  # top-1 + at most max_extra additions, no leaf twice
        tasks = [c["task_type"] for c in cands]
        assert len(tasks) <= 1 + max_extra and len(set(tasks)) == len(tasks)


def test_a_leaf_is_short_only_when_every_image_is_used_up():
    import numpy as np

    from processors.clip.coverage import plan_coverage

    rng = np.random.default_rng(1)
    bank = _bank(12, 8, rng)
    vectors = rng.normal(size=(4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    plan = plan_coverage([f"i{i}" for i in range(4)], vectors, {}, bank, top_k=1, minimum=2, max_extra=1)
    assert all(len(c) == 2 for c in plan.candidates.values())  # every image full
    assert plan.leaves_short  # 12 leaves x 2 > 4 images x 2 slots


def test_chunked_top_k_equals_the_whole_matrix():
    import numpy as np

    from processors.clip.coverage import _topk

    rng = np.random.default_rng(2)
    a = rng.normal(size=(53, 8)).astype(np.float32)
    b = rng.normal(size=(37, 8)).astype(np.float32)
    scores, index = _topk(a, b, 5, chunk=6)
    full = a @ b.T
    expect = np.argsort(-full, axis=1)[:, :5]
    assert (index == expect).all()
    assert np.allclose(scores, np.take_along_axis(full, expect, axis=1), atol=1e-5)
