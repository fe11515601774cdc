"""The comparison of rows computed in two processes (``same_rows``): float noise passes, a real change does not;
a vote may differ only where its p_yes lies at the 0.5 boundary, and ranked candidates may trade places only
where their scores tie."""

from __future__ import annotations

import pyarrow as pa
import pytest
from same_rows import TOL, assert_same_rows


def _scored(p_yes: float, vote: int, other_vote: int = 1) -> pa.Table:
    return pa.Table.from_pylist([{"qa_id": "q1", "votes": {"tiny": vote, "ep": other_vote},
                                  "p_yes": {"tiny": p_yes, "ep": 0.9}, "total": vote + other_vote}])


def _ranked(*candidates: tuple[str, float]) -> pa.Table:
    return pa.Table.from_pylist([{"image_id": "i1", "candidates": [{"task_id": t, "score": s} for t, s in candidates]}])


def test_float_noise_of_another_thread_count_passes_a_real_change_does_not():
    assert_same_rows(_scored(0.3141610, 0), _scored(0.3141613, 0))  # 3e-7: what 1 vs 3 threads gave
    with pytest.raises(AssertionError, match=r"row 0\.p_yes\.tiny"):
        assert_same_rows(_scored(0.3141610, 0), _scored(0.3151610, 0))
    with pytest.raises(AssertionError, match="row 0.qa_id"):
        assert_same_rows(_scored(0.3, 0), pa.Table.from_pylist([{**_scored(0.3, 0).to_pylist()[0], "qa_id": "q2"}]))


def test_a_vote_may_flip_only_at_the_boundary_and_the_total_follows_it():
    assert_same_rows(_scored(0.5 + TOL / 4, 1), _scored(0.5 - TOL / 4, 0))  # honestly either vote
    with pytest.raises(AssertionError, match=r"votes\.tiny"):
        assert_same_rows(_scored(0.31, 1), _scored(0.31, 0))  # far from 0.5: a vote that differs is a bug
    flipped, other = _scored(0.5 + TOL / 4, 1).to_pylist()[0], _scored(0.5 - TOL / 4, 0).to_pylist()[0]
    flipped["total"] = other["total"]  # a total that did not follow its vote
    with pytest.raises(AssertionError, match="row 0.total"):
        assert_same_rows(pa.Table.from_pylist([flipped]), pa.Table.from_pylist([other]))


def test_candidates_may_trade_places_only_where_their_scores_tie():
    assert_same_rows(_ranked(("a", 0.80000001), ("b", 0.8)), _ranked(("b", 0.80000001), ("a", 0.8)))
    with pytest.raises(AssertionError, match="score"):
        assert_same_rows(_ranked(("a", 0.9), ("b", 0.8)), _ranked(("b", 0.9), ("a", 0.8)))
    with pytest.raises(AssertionError, match="not among"):
        assert_same_rows(_ranked(("a", 0.9), ("b", 0.8)), _ranked(("a", 0.9), ("c", 0.8)))
