"""Balanced selection for the ``final`` stage: exactly N samples, spread over first-level categories and task
types, best first within a type.

The eligible rows (votes at the threshold, no other check failed) are ranked within their task type by the
referees' mean p(yes), ties broken by a seeded hash of ``qa_id`` (so the order never depends on shard or
row order). ``per_task_max`` cuts each type's tail (``balance_cap``). The rest are ordered for picking:
first every type's best ``per_task_min`` rows, then everything else; each of the two blocks interleaves the
categories one row at a time, and inside a category its types one row at a time. The first ``target_total``
rows of that order are kept — which is max-min fair at both levels (a category or type with fewer rows than
its fair share gives the rest to the others) — and the others fail with ``balance_target``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest

BALANCE_CAP = "balance_cap"
BALANCE_TARGET = "balance_target"


@dataclass(frozen=True)
class Candidate:
    qa_id: str
    task_type: str
    p_yes: float | None  # the referees' mean p(yes); None ranks last


@dataclass
class Selection:
    kept: set[str]
    dropped: dict[str, tuple[str, str]]  # qa_id -> (reason, detail)
    shortfall: int = 0  # target_total minus what could be kept (fewer eligible rows than asked)
    summary: dict = field(default_factory=dict)


def mean_p_yes(p_yes: dict[str, float | None] | None) -> float | None:
    values = [v for v in (p_yes or {}).values() if v is not None]
    return sum(values) / len(values) if values else None


def _tiebreak(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def _interleave(groups: Sequence[Sequence[str]]) -> list[str]:
    return [x for x in chain.from_iterable(zip_longest(*groups)) if x is not None]


def select_balanced(candidates: Sequence[Candidate], *, target_total: int | None = None,
                    per_task_max: int | None = None, per_task_min: int = 0, seed: int = 0) -> Selection:
    """Which candidates the final stage keeps; deterministic for a seed, whatever the input order."""
    by_type: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_type.setdefault(c.task_type, []).append(c)
    dropped: dict[str, tuple[str, str]] = {}
    ranked: dict[str, list[str]] = {}
    for task_type, rows in by_type.items():
        rows.sort(key=lambda c: (-(c.p_yes if c.p_yes is not None else -1.0), _tiebreak(seed, c.qa_id)))
        if per_task_max is not None:
            for rank, c in enumerate(rows[per_task_max:], start=per_task_max + 1):
                dropped[c.qa_id] = (BALANCE_CAP, f"rank {rank} of {len(rows)} in task type {task_type!r}, "
                                    f"over per_task_max={per_task_max}")
            rows = rows[:per_task_max]
        ranked[task_type] = [c.qa_id for c in rows]
    by_category: dict[str, list[str]] = {}
    for task_type in ranked:
        by_category.setdefault(task_type.split("~", 1)[0], []).append(task_type)
    categories = sorted(by_category, key=lambda name: _tiebreak(seed, name))
    types_of = {cat: sorted(types, key=lambda t: _tiebreak(seed, t)) for cat, types in by_category.items()}

    def block(lo: int, hi: int | None) -> list[str]:
        return _interleave([_interleave([ranked[t][lo:hi] for t in types_of[cat]]) for cat in categories])

    order = block(0, per_task_min) + block(per_task_min, None) if per_task_min else block(0, None)
    available = len(order)
    take = available if target_total is None else min(target_total, available)
    kept = set(order[:take])
    category_of = {qa: t.split("~", 1)[0] for t, ids in ranked.items() for qa in ids}
    for position, qa_id in enumerate(order[take:], start=take + 1):
        dropped[qa_id] = (BALANCE_TARGET, f"position {position} of {available} in the balanced order "
                          f"(category {category_of[qa_id]!r}); target_total={target_total}")
    shortfall = 0 if target_total is None else max(0, target_total - available)
    return Selection(kept=kept, dropped=dropped, shortfall=shortfall, summary={
        "eligible": len(candidates), "kept": len(kept), "target_total": target_total,
        "per_task_max": per_task_max, "per_task_min": per_task_min, "shortfall": shortfall,
        "dropped_by_reason": {r: sum(1 for d in dropped.values() if d[0] == r) for r in (BALANCE_CAP, BALANCE_TARGET)},
    })
