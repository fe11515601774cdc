"""The match stage's coverage pass: every leaf gets at least m candidate images (reverse top-k)."""

from __future__ import annotations

from collections import Counter

import test_match_stage as base  # its toy taxonomy, images and runner helper
from test_match_stage import run_dir  # noqa: F401 - the fixture

from builder.outputs import load_stage_failures, load_stage_output
from processors.clip.config import ClipMatchConfig
from processors.stages.match import Match

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
    off = Match().fingerprint_config(ClipMatchConfig(pretrained=None))
    assert "coverage_min" not in off and "coverage_max_extra" not in off
    on = Match().fingerprint_config(ClipMatchConfig(pretrained=None, coverage_min=3))
    assert on["coverage_min"] == 3 and on["coverage_max_extra"] == 3
