"""The quality plots, as PNGs in the final stage's folder (the dataset card embeds every one): CLIP score
histogram, vote distribution, coverage per level, kept samples per image source, samples per leaf.

matplotlib on the Agg backend (no display), imported only here, only when called. A plot with no data is not
drawn rather than drawn empty.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

from builder.runfolder import atomic_write_bytes

logger = logging.getLogger(__name__)

STAGES = ("match", "filter", "qa", "final")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4), dpi=100)


def _save(plt, fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _clip_scores(data, stats, ax) -> bool:
    scores = data.get("clip_scores")
    if scores is None or not len(scores):
        return False
    ax.hist(scores, bins=50, alpha=0.6, label="every candidate")
    if data.get("clip_top1") is not None and len(data["clip_top1"]):
        ax.hist(data["clip_top1"], bins=50, alpha=0.6, label="best candidate of each image")
    ax.set(title="CLIP cosine similarity of the match candidates", xlabel="cosine", ylabel="candidates")
    ax.legend()
    return True


def _votes(data, stats, ax) -> bool:
    agreement = stats.get("agreement")
    if not agreement:
        return False
    patterns = agreement["overall"]["patterns"]
    labels = list(reversed(patterns))
    ax.bar(labels, [patterns[p] for p in labels], color="tab:blue")
    ax.set(title="Referee votes per question (yes votes / referees)", xlabel="yes votes", ylabel="questions")
    return True


def _coverage_levels(data, stats, ax) -> bool:
    coverage = stats.get("coverage")
    if not coverage:
        return False
    stages = [s for s in STAGES if s in coverage["stages"]]
    levels = sorted({lvl for s in stages for lvl in coverage["stages"][s]["nodes_covered_by_level"]}, key=int)
    width = 0.8 / max(1, len(stages))
    for offset, stage in enumerate(stages):
        by_level = coverage["stages"][stage]["nodes_covered_by_level"]
        shares = [by_level[lvl]["covered"] / by_level[lvl]["nodes"] if lvl in by_level and by_level[lvl]["nodes"]
                  else 0 for lvl in levels]
        ax.bar([i + offset * width for i in range(len(levels))], shares, width, label=stage)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(levels))], [f"level {lvl}" for lvl in levels])
    ax.set(title="Share of taxonomy nodes with at least one row, per level", ylabel="share covered", ylim=(0, 1.05))
    ax.legend()
    return True


def _kept_by_source(data, stats, ax) -> bool:
    sources = Counter(data.get("kept_sources") or [])
    if not sources:
        return False
    names = [name for name, _ in sources.most_common(30)]
    shown = [str(n).replace("$", r"\$") for n in names]  # a pair of $ would be typeset as mathematics
    ax.barh(shown[::-1], [sources[n] for n in names[::-1]], color="tab:green")
    ax.set(title="Kept samples per image source", xlabel="samples")
    return True


def _samples_per_leaf(data, stats, ax) -> bool:
    final = (stats.get("coverage") or {}).get("stages", {}).get("final")
    if not final:
        return False
    bins = final["histogram"]
    ax.bar(list(bins), list(bins.values()), color="tab:orange")
    ax.set(title="Leaf task types by number of final samples", xlabel="samples per leaf", ylabel="leaves")
    return True


PLOTS = {
    "quality_clip_scores.png": _clip_scores,
    "quality_votes.png": _votes,
    "quality_coverage_levels.png": _coverage_levels,
    "quality_kept_by_source.png": _kept_by_source,
    "quality_samples_per_leaf.png": _samples_per_leaf,
}


def write_plots(folder: Path, data: dict, stats: dict) -> list[str]:
    """Draw every plot that has data; returns the file names written."""
    written = []
    for name, draw in PLOTS.items():
        plt, fig, ax = _figure()
        try:
            if draw(data, stats, ax):
                _save(plt, fig, folder / name)
                written.append(name)
        finally:
            plt.close(fig)
    return written
