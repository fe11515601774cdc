"""Balanced selection: exactly N, spread over categories and task types, best p(yes) first, deterministic."""

from __future__ import annotations

import random
from collections import Counter

from processors.quality.selection import BALANCE_CAP, BALANCE_TARGET, Candidate, select_balanced


def _table(seed: int = 0) -> list[Candidate]:
    """Category A: 3 types with 40, 10, 2 rows; B: 1 type with 30; C: 2 types with 5 and 5."""
    rng = random.Random(seed)
    sizes = {"A~a1": 40, "A~a2": 10, "A~a3": 2, "B~b1": 30, "C~c1": 5, "C~c2": 5}
    rows = [Candidate(f"{t}-{i}", t, round(rng.random(), 3)) for t, n in sizes.items() for i in range(n)]
    rng.shuffle(rows)
    return rows


def _counts(kept, attr):
    return Counter(qa.split("-")[0] if attr == "type" else qa.split("~")[0] for qa in kept)


def test_exactly_n_balanced_over_categories_then_types():
    rows = _table()
    selection = select_balanced(rows, target_total=30)
    assert len(selection.kept) == 30 and selection.shortfall == 0
    # max-min fair over categories: C has only 10, so A and B share the other 20 equally
    assert _counts(selection.kept, "category") == {"A": 10, "B": 10, "C": 10}
    # inside A: a3 has only 2, a1 and a2 split the remaining 8
    types = _counts(selection.kept, "type")
    assert (types["A~a1"], types["A~a2"], types["A~a3"]) == (4, 4, 2)
    assert len(selection.dropped) == len(rows) - 30
    assert {reason for reason, _ in selection.dropped.values()} == {BALANCE_TARGET}


def test_within_a_type_the_best_mean_p_yes_is_kept():
    rows = _table()
    kept = select_balanced(rows, target_total=30).kept
    b_rows = sorted((r for r in rows if r.task_type == "B~b1"), key=lambda r: -r.p_yes)
    assert {r.qa_id for r in b_rows[:10]} == {q for q in kept if q.startswith("B~b1")}


def test_deterministic_whatever_the_input_order():
    rows = _table()
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    assert select_balanced(rows, target_total=25, seed=3).kept == select_balanced(shuffled, target_total=25, seed=3).kept


def test_per_task_max_caps_and_per_task_min_comes_first():
    rows = _table()
    capped = select_balanced(rows, per_task_max=6)
    assert max(_counts(capped.kept, "type").values()) == 6
    assert sum(1 for r, _ in capped.dropped.values() if r == BALANCE_CAP) == (40 - 6) + (10 - 6) + (30 - 6)
    # a target smaller than categories x types: per_task_min=1 gives every type its best row first
    small = select_balanced(rows, target_total=6, per_task_min=1)
    assert set(_counts(small.kept, "type")) == {"A~a1", "A~a2", "A~a3", "B~b1", "C~c1", "C~c2"}


def test_a_target_above_what_passed_keeps_all_and_reports_the_shortfall():
    rows = _table()
    selection = select_balanced(rows, target_total=500)
    assert len(selection.kept) == len(rows) and selection.shortfall == 500 - len(rows)
