"""Statistics of a taxonomy from its leaf paths: types per level, branching, depth histogram, origins.

Computed from the leaves alone (the stage's output rows), so ``finalize`` and anyone reading a finished run
get the same numbers; internal nodes are the distinct prefixes of the leaf paths.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from loaders.taxonomy.names import path_key


def tree_stats(leaf_paths: Sequence[Sequence[str]], origins: Iterable[str] = ()) -> dict:
    nodes_per_level: dict[int, set] = defaultdict(set)
    children: dict[tuple, set] = defaultdict(set)
    for parts in leaf_paths:
        key = path_key(parts)
        for depth in range(1, len(key) + 1):
            nodes_per_level[depth].add(key[:depth])
            children[key[: depth - 1]].add(key[:depth])
    branching = {}
    for level in sorted(nodes_per_level):
        counts = [len(children[node]) for node in nodes_per_level[level] if children.get(node)]
        if counts:
            branching[str(level)] = {
                "parents": len(counts),
                "mean": round(statistics.fmean(counts), 2),
                "median": statistics.median(counts),
                "max": max(counts),
            }
    depths = Counter(len(parts) for parts in leaf_paths)
    return {
        "leaves": len(leaf_paths),
        "nodes": sum(len(nodes) for nodes in nodes_per_level.values()),
        "first_level": len(nodes_per_level.get(1, ())),
        "max_depth": max(depths, default=0),
        "types_per_level": {str(level): len(nodes) for level, nodes in sorted(nodes_per_level.items())},
        "leaf_depth_histogram": {str(depth): count for depth, count in sorted(depths.items())},
        "branching": branching,
        "leaf_origins": dict(Counter(origins)),
    }


def format_stats(stats: dict) -> str:
    """A few human lines (for logs and the CLI) out of ``tree_stats``."""
    levels = ", ".join(f"L{k}: {v}" for k, v in stats["types_per_level"].items())
    depths = ", ".join(f"{k}: {v}" for k, v in stats["leaf_depth_histogram"].items())
    branching = ", ".join(f"L{k}: {v['mean']}" for k, v in stats["branching"].items())
    return (
        f"{stats['leaves']} task types (leaves), {stats['nodes']} nodes; per level {levels}; "
        f"leaf depths {depths}; mean children per parent {branching}"
    )
