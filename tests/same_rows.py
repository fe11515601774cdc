"""Comparing a stage's rows computed in two processes (a spawned worker, a Ray worker) or by two engines.

A model's float output (a referee's ``p_yes``, a CLIP ``score``) may differ in its last bits between
processes: BLAS and torch split a reduction by the threads they have, and the sum comes out in another order.
So floats compare within ``TOL``; what is read off a float compares exactly wherever the float is clear of its
decision boundary by more than ``TOL`` — a vote is ``p_yes > 0.5``, and a ``p_yes`` within ``TOL`` of 0.5 may
honestly come out as either vote (the row total then differs by the same amount). Candidates ranked by score
may swap places only where their scores tie within ``TOL``. Everything else compares exactly.
"""

from __future__ import annotations

import math

TOL = 1e-4  # float32 noise across processes is ~1e-7; this is three orders above it, far below any real change


def assert_same_rows(got, want, *, tol: float = TOL) -> None:
    """``got`` and ``want`` (``pyarrow.Table``) hold the same rows in the same order, up to the float noise
    described in the module docstring; the assertion names the first row and field that differs."""
    assert got.schema == want.schema, f"schemas differ:\n{got.schema}\n---\n{want.schema}"
    assert got.num_rows == want.num_rows, f"{got.num_rows} rows, expected {want.num_rows}"
    for index, (a, b) in enumerate(zip(got.to_pylist(), want.to_pylist())):
        _same(a, b, tol, f"row {index}")


def votes_may_differ(p_yes_a, p_yes_b, tol: float = TOL) -> bool:
    """A vote read off these p_yes may honestly differ: either lies within ``tol`` of the 0.5 boundary."""
    return any(p is not None and abs(p - 0.5) <= tol for p in (p_yes_a, p_yes_b))


def _same(a, b, tol: float, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: fields {sorted(a)} != {sorted(b)}"
        if "votes" in a and "p_yes" in a:
            _same_scored_row(a, b, tol, where)
            return
        for key in a:
            _same(a[key], b[key], tol, f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        if a and all(isinstance(x, dict) and "score" in x for x in (*a, *b)):
            _same_ranking(a, b, tol, where)
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and math.isclose(a, b, rel_tol=tol, abs_tol=tol), \
            f"{where}: {a!r} != {b!r} (tolerance {tol})"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _same_scored_row(a: dict, b: dict, tol: float, where: str) -> None:
    """A row of the score stage (or one carrying its columns): p_yes within ``tol``, each vote equal unless
    its p_yes lies within ``tol`` of 0.5, the total off by exactly the votes that may differ."""
    _same(a["p_yes"], b["p_yes"], tol, f"{where}.p_yes")
    flipped = 0
    assert a["votes"].keys() == b["votes"].keys(), f"{where}.votes: {a['votes']} != {b['votes']}"
    for name, vote in a["votes"].items():
        other = b["votes"][name]
        if vote != other and vote is not None and other is not None and \
                votes_may_differ((a["p_yes"] or {}).get(name), (b["p_yes"] or {}).get(name), tol):
            flipped += vote - other
            continue
        assert vote == other, f"{where}.votes.{name}: {vote!r} != {other!r} (p_yes {a['p_yes']} vs {b['p_yes']})"
    for key in a.keys() - {"votes", "p_yes"}:
        if key == "total" and flipped:
            assert a[key] - b[key] == flipped, f"{where}.total: {a[key]} != {b[key]} + {flipped} (flipped votes)"
            continue
        _same(a[key], b[key], tol, f"{where}.{key}")


def _same_ranking(a: list[dict], b: list[dict], tol: float, where: str) -> None:
    """Ranked candidates: the same scores rank by rank, the same candidates each with its score; so two may
    trade places only where their scores tie within ``tol``."""
    for i, (x, y) in enumerate(zip(a, b)):
        _same(x["score"], y["score"], tol, f"{where}[{i}].score")
    rest = lambda item: {k: v for k, v in item.items() if k != "score"}  # noqa: E731
    by_id = {repr(sorted(rest(y).items())): y for y in b}
    for i, x in enumerate(a):
        key = repr(sorted(rest(x).items()))
        assert key in by_id, f"{where}[{i}]: {rest(x)} is not among the other side's candidates"
        _same(x["score"], by_id[key]["score"], tol, f"{where}[{i}].score (by candidate)")
