"""Taxonomy coverage: for every leaf task type, how many rows of each stage carry it, and summaries of that.

The paper's point is task diversity, yet top-k matching + filter + vote can leave many leaves without a
sample while a head of a few leaves holds thousands. The report says, per stage: leaves covered (by depth),
nodes of each level with any sample below them, empty leaves, the share of rows held by the top 1 % of
leaves (the head), and a histogram of rows per leaf.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

SEPARATOR = "~"
HISTOGRAM_BINS = ((0, 0), (1, 1), (2, 4), (5, 9), (10, 49), (50, 99), (100, None))
STAGE_ORDER = ("match", "filter", "qa", "score", "final")
EMPTY_EXAMPLES = 10


def _bin_label(lo: int, hi: int | None) -> str:
    return str(lo) if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")


def histogram(counts: Iterable[int]) -> dict[str, int]:
    """Leaves per bin of rows-per-leaf (``"0"``, ``"1"``, ``"2-4"``, ... ``"100+"``)."""
    out = {_bin_label(lo, hi): 0 for lo, hi in HISTOGRAM_BINS}
    for n in counts:
        for lo, hi in HISTOGRAM_BINS:
            if n >= lo and (hi is None or n <= hi):
                out[_bin_label(lo, hi)] += 1
                break
    return out


def head_share(counts: Sequence[int], fraction: float = 0.01) -> float:
    """Share of all rows held by the ``fraction`` of leaves with the most rows (at least one leaf)."""
    total = sum(counts)
    if not total:
        return 0.0
    top = max(1, math.ceil(len(counts) * fraction))
    return round(sum(sorted(counts, reverse=True)[:top]) / total, 4)


def stage_coverage(leaves: Sequence[str], counts: Mapping[str, int]) -> dict:
    per_leaf = [counts.get(leaf, 0) for leaf in leaves]
    known = set(leaves)
    by_depth: dict[int, list[int]] = {}
    nodes: dict[int, dict[str, bool]] = {}
    for leaf, n in zip(leaves, per_leaf):
        parts = leaf.split(SEPARATOR)
        entry = by_depth.setdefault(len(parts), [0, 0])
        entry[0] += n > 0
        entry[1] += 1
        for level in range(1, len(parts) + 1):
            prefix = SEPARATOR.join(parts[:level])
            level_nodes = nodes.setdefault(level, {})
            level_nodes[prefix] = level_nodes.get(prefix, False) or n > 0
    empty = [leaf for leaf, n in zip(leaves, per_leaf) if n == 0]
    return {
        "rows": sum(per_leaf),
        "rows_outside_taxonomy": sum(n for leaf, n in counts.items() if leaf not in known),
        "leaves_covered": len(leaves) - len(empty),
        "leaves_empty": len(empty),
        "empty_examples": empty[:EMPTY_EXAMPLES],
        "covered_by_depth": {str(d): {"covered": c, "leaves": t} for d, (c, t) in sorted(by_depth.items())},
        "nodes_covered_by_level": {str(level): {"covered": sum(v.values()), "nodes": len(v)}
                                   for level, v in sorted(nodes.items())},
        "head_share_top1pct": head_share(per_leaf),
        "max_per_leaf": max(per_leaf, default=0),
        "histogram": histogram(per_leaf),
    }


def coverage_report(leaves: Sequence[str], stage_paths: Mapping[str, Iterable[str]]) -> tuple[dict, dict]:
    """(report, per-leaf counts). ``stage_paths``: for each stage, the task path of every row it holds (one
    entry per match candidate, per kept filter label, per QA...), or those counted already (path -> rows)."""
    counts = {stage: Counter(paths) if not isinstance(paths, Mapping) else Counter(dict(paths))
              for stage, paths in stage_paths.items()}
    report = {"leaves": len(leaves), "stages": {s: stage_coverage(leaves, counts[s]) for s in counts}}
    return report, counts


# A cell a spreadsheet would read as a formula (OWASP "CSV injection"): prefixed with ' so it shows as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text_cell(text: str) -> str:
    """``text`` for a CSV cell a spreadsheet opens: one starting like a formula gets a leading ``'``."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def per_leaf_csv(leaves: Sequence[str], counts: Mapping[str, Counter]) -> str:
    """One line per leaf: its path, depth, and the rows of each stage carrying it (a spreadsheet's view; a
    path starting like a formula is prefixed with ``'``, see ``csv_text_cell``)."""
    import csv
    import io

    stages = [s for s in STAGE_ORDER if s in counts] + [s for s in counts if s not in STAGE_ORDER]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)  # a quoted \r ends no row
    writer.writerow(["task_type", "depth", *stages])
    for leaf in leaves:
        writer.writerow([csv_text_cell(leaf), leaf.count(SEPARATOR) + 1, *(counts[s].get(leaf, 0) for s in stages)])
    return buffer.getvalue()
