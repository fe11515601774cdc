"""How much the referees agree: yes-rate per referee, pairwise Cohen's kappa, Fleiss' kappa, vote patterns.

Pure functions over the score stage's ``votes`` column (one ``{referee: 0/1/None}`` dict per row). A vote that
is ``None`` (missing under the ``abstain`` policy) leaves that row out of every statistic that needs that
referee: kappa on partial ballots would mix different sets of items.

Under the score stage's referee cascade a vote not asked is ``None`` too: each pair's kappa is then over the
questions both referees were asked, which for a later referee are the questions the earlier ones left open
(mostly disagreements), so it is not comparable with a full vote's. ``agreement_report(cascade=True)`` says so
and gives each pair's count of questions (``pair_rows``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Cohen's kappa of two raters over the same binary items; None when undefined (no items, or both raters
    constant and equal, where chance agreement is 1)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(yes_counts: Sequence[int], raters: int) -> float | None:
    """Fleiss' kappa for binary ratings: ``yes_counts[i]`` of ``raters`` said yes on item i. None when undefined
    (fewer than two raters or items, or every rating the same)."""
    n = len(yes_counts)
    if n == 0 or raters < 2:
        return None
    m = raters
    p_items = [(y * (y - 1) + (m - y) * (m - y - 1)) / (m * (m - 1)) for y in yes_counts]
    p_bar = sum(p_items) / n
    p_yes = sum(yes_counts) / (n * m)
    p_e = p_yes**2 + (1 - p_yes) ** 2
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def agreement(votes: Sequence[dict[str, int | None]], referees: Sequence[str] | None = None, *,
              cascade: bool = False) -> dict:
    """The agreement report of one set of rows: ``rows``, ``complete`` (rows every referee voted on),
    ``yes_rate`` per referee, ``cohen_kappa`` per pair (``"a|b"``), ``fleiss_kappa`` and ``patterns``
    (``"3/3"``: rows with that many yes votes among the complete ones)."""
    names = list(referees) if referees is not None else sorted({k for v in votes for k in v})
    yes_rate = {}
    for name in names:
        cast = [v[name] for v in votes if v.get(name) is not None]
        yes_rate[name] = _rounded(sum(cast) / len(cast)) if cast else None
    pairs, pair_rows = {}, {}
    for x, y in combinations(names, 2):
        both = [(v[x], v[y]) for v in votes if v.get(x) is not None and v.get(y) is not None]
        pairs[f"{x}|{y}"] = _rounded(cohen_kappa([p[0] for p in both], [p[1] for p in both]))
        pair_rows[f"{x}|{y}"] = len(both)
    complete = [sum(v[n] for n in names) for v in votes if all(v.get(n) is not None for n in names)]
    counts = Counter(complete)
    patterns = {f"{k}/{len(names)}": counts.get(k, 0) for k in range(len(names), -1, -1)}
    extra = {"pair_rows": pair_rows} if cascade else {}
    return {
        **extra,
        "rows": len(votes),
        "complete": len(complete),
        "yes_rate": yes_rate,
        "cohen_kappa": pairs,
        "fleiss_kappa": _rounded(fleiss_kappa(complete, len(names))),
        "patterns": patterns,
    }


CASCADE_NOTE = ("referee cascade: a later referee was asked only where the earlier ones left the outcome open, "
                "so each pair's kappa is over the questions both were asked (pair_rows), not over every question; "
                "patterns count only the questions every referee was asked")


def agreement_report(votes: Sequence[dict[str, int | None]], task_types: Sequence[str],
                     referees: Sequence[str] | None = None, *, cascade: bool = False) -> dict:
    """``overall`` plus ``by_category``: the same report per first-level category of each row's task path.
    ``cascade``: the votes come from the referee cascade (``CASCADE_NOTE``)."""
    names = list(referees) if referees is not None else sorted({k for v in votes for k in v})
    groups: dict[str, list] = {}
    for vote, path in zip(votes, task_types, strict=True):
        groups.setdefault(path.split("~", 1)[0], []).append(vote)
    return {
        "referees": names,
        **({"note": CASCADE_NOTE} if cascade else {}),
        "overall": agreement(votes, names, cascade=cascade),
        "by_category": {category: agreement(rows, names, cascade=cascade)
                        for category, rows in sorted(groups.items())},
    }
