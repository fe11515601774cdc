"""Referee agreement against a case worked out by hand (six questions, three referees)."""

from __future__ import annotations

import pytest

from processors.quality.agreement import agreement, agreement_report, cohen_kappa, fleiss_kappa

A = [1, 1, 1, 0, 0, 1]
B = [1, 1, 0, 0, 1, 1]
C = [1, 0, 0, 0, 1, 1]
VOTES = [{"a": a, "b": b, "c": c} for a, b, c in zip(A, B, C)]


def test_cohen_kappa_matches_the_hand_computation():
    # a|b: observed 4/6, both yes-rates 2/3 -> chance 5/9 -> (2/3 - 5/9) / (4/9) = 1/4
    assert cohen_kappa(A, B) == pytest.approx(0.25)
    # a|c: observed 3/6, yes-rates 2/3 and 1/2 -> chance 1/2 -> 0
    assert cohen_kappa(A, C) == pytest.approx(0.0)
    # b|c: observed 5/6, chance 1/2 -> 2/3
    assert cohen_kappa(B, C) == pytest.approx(2 / 3)
    assert cohen_kappa([1, 1], [1, 1]) is None  # chance agreement 1: undefined, not 1 or 0


def test_fleiss_kappa_matches_the_hand_computation():
    # yes counts 3,2,1,0,2,3 of 3: P_bar = 2/3, p_yes = 11/18, P_e = 85/162 -> kappa = 23/77
    assert fleiss_kappa([3, 2, 1, 0, 2, 3], 3) == pytest.approx(23 / 77)
    assert fleiss_kappa([3, 3], 3) is None


def test_report_counts_patterns_yes_rates_and_skips_missing_votes():
    report = agreement(VOTES + [{"a": 1, "b": None, "c": 0}], ["a", "b", "c"])
    assert report["rows"] == 7 and report["complete"] == 6
    assert report["patterns"] == {"3/3": 2, "2/3": 2, "1/3": 1, "0/3": 1}
    assert report["yes_rate"] == {"a": pytest.approx(5 / 7, abs=1e-4), "b": pytest.approx(2 / 3, abs=1e-4),
                                  "c": pytest.approx(3 / 7, abs=1e-4)}
    assert report["fleiss_kappa"] == pytest.approx(23 / 77, abs=1e-4)
    assert report["cohen_kappa"]["b|c"] == pytest.approx(2 / 3, abs=1e-4)


def test_report_per_first_level_category():
    paths = ["OCR~x", "OCR~y", "OCR~z", "Counting~a", "Counting~b", "Counting~c"]
    report = agreement_report(VOTES, paths, ["a", "b", "c"])
    assert set(report["by_category"]) == {"OCR", "Counting"}
    assert report["by_category"]["OCR"]["patterns"] == {"3/3": 1, "2/3": 1, "1/3": 1, "0/3": 0}
    assert report["overall"]["rows"] == 6


def test_votes_named_missing_are_no_votes_under_missing_vote_zero():
    """Under `missing_vote: zero` an outage is stored as 0; the report must not read it as a "no"."""
    from processors.quality.report import ballots

    stored = VOTES + [{"a": 1, "b": 0, "c": 0}]  # b and c were down for the last row: stored as 0
    votes = ballots(stored, [[]] * 6 + [["b", "c"]], ["a", "b", "c"])
    assert votes[-1] == {"a": 1, "b": None, "c": None}
    report = agreement(votes, ["a", "b", "c"])
    assert report["complete"] == 6 and report["patterns"] == {"3/3": 2, "2/3": 2, "1/3": 1, "0/3": 1}
    assert report["yes_rate"]["b"] == pytest.approx(2 / 3, abs=1e-4)  # not 4/7
    assert report["cohen_kappa"]["b|c"] == pytest.approx(2 / 3, abs=1e-4)
    assert ballots(stored, None, ["a"])[-1] == {"a": 1}  # a score table without the column: as stored


def test_cascade_votes_report_each_pair_over_the_questions_both_were_asked():
    from processors.quality.agreement import CASCADE_NOTE, agreement_report

    # a and b always asked; c only where they disagree (None = not asked)
    votes = [{"a": 1, "b": 1, "c": None}, {"a": 0, "b": 0, "c": None}, {"a": 1, "b": 0, "c": 1},
             {"a": 0, "b": 1, "c": 0}]
    report = agreement_report(votes, ["X~y"] * 4, ["a", "b", "c"], cascade=True)
    assert report["note"] == CASCADE_NOTE
    assert report["overall"]["pair_rows"] == {"a|b": 4, "a|c": 2, "b|c": 2}
    assert report["overall"]["complete"] == 2
    assert "note" not in agreement_report(votes, ["X~y"] * 4, ["a", "b", "c"])
