"""The final stage's quality report: coverage, referee agreement, what each check rejected, and plots.

Written by ``FinalStage.finalize`` into the final stage's folder, where the rest of the tooling finds it
without knowing what it says: ``stats.json`` (``taskgalaxy status`` shows it, its ``summary`` lines in the
table), ``card.md`` (a section of the dataset card), ``*.png`` (embedded in the card) and
``coverage_per_leaf.csv`` (published beside the card).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builder.outputs import column_values
from builder.runfolder import atomic_write_bytes
from processors.quality.agreement import agreement_report
from processors.quality.coverage import coverage_report, per_leaf_csv
from processors.quality.report_text import card_section, summary_lines

logger = logging.getLogger(__name__)

COVERAGE_CSV = "coverage_per_leaf.csv"


def _flat(dataset, column: str, field: str | None = None):
    """Every element of a list column (or one field of its structs), flattened, as an Arrow array: the match
    stage holds top-k dicts per image (8 M of them at the paper's scale), too many to build as Python dicts."""
    flat = pc.list_flatten(dataset.data.column(column).combine_chunks())
    return pc.struct_field(flat, field) if field is not None else flat


def value_counts(array) -> dict[str, int]:
    """How many times each value occurs (Arrow's ``value_counts``: no Python object per row)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    counts = pc.value_counts(array)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def _first_scores(dataset):
    """The best candidate's score of every image with candidates, as a NumPy array."""
    lists = dataset.data.column("candidates").combine_chunks()
    lists = lists.filter(pc.greater(pc.list_value_length(lists), 0))
    if not len(lists):
        return np.zeros(0, dtype=np.float32)
    return pc.struct_field(pc.list_element(lists, 0), "score").to_numpy(zero_copy_only=False)


def _leaves(taxonomy) -> list[str]:
    from processors.clip.text import leaf_mask

    paths = column_values(taxonomy, "path")
    return [p for p, leaf in zip(paths, leaf_mask(paths)) if leaf]


def collect(load, final) -> dict:
    """The tables the report reads, as plain lists; a stage that cannot be loaded is left out."""
    def safe(name):
        try:
            return load(name)
        except Exception as exc:  # noqa: BLE001 - a report on what exists is better than none
            logger.warning("quality report: stage %s not available (%s)", name, exc)
            return None

    data: dict = {}
    taxonomy, match, filt, qa, score, images = (safe(n) for n in ("taxonomy", "match", "filter", "qa", "score", "images"))
    if taxonomy is not None:
        data["leaves"] = _leaves(taxonomy)
    counts: dict[str, dict[str, int]] = {}
    if match is not None:
        counts["match"] = value_counts(_flat(match, "candidates", "task_type"))
        data["clip_scores"] = _flat(match, "candidates", "score").to_numpy(zero_copy_only=False)
        data["clip_top1"] = _first_scores(match)
    if filt is not None:
        counts["filter"] = value_counts(_flat(filt, "task_types"))
    if qa is not None:
        counts["qa"] = value_counts(qa.data.column("task_type"))
    if score is not None:
        counts["score"] = value_counts(score.data.column("task_type"))
        data["votes"] = column_values(score, "votes")
        data["missing"] = column_values(score, "missing") if "missing" in score.column_names else None
        data["cascade"] = "not_asked" in score.column_names
        data["score_task_types"] = column_values(score, "task_type")
    counts["final"] = value_counts(final.data.column("task_type"))
    data["paths"] = counts
    data["final_votes_total"] = column_values(final, "votes_total")
    if images is not None:
        source_of = dict(zip(column_values(images, "image_id"), column_values(images, "source")))
        data["kept_sources"] = [source_of.get(i, "?") for i in column_values(final, "image_id")]
    return data


def ballots(votes: list[dict], missing: list | None, referees: list[str]) -> list[dict]:
    """Each row's votes of ``referees``, a vote named in the row's ``missing`` list as None: under the score
    stage's ``missing_vote: zero`` it is stored as 0, but an outage is no "no" (yes-rates, kappas, patterns)."""
    missing = missing or [None] * len(votes)
    return [{name: (None if gone and name in gone else v.get(name)) for name in referees}
            for v, gone in zip(votes, missing)]


def build_report(data: dict, *, summary: dict, referees: list[str]) -> tuple[dict, str | None]:
    """(stats, per-leaf CSV text) from ``collect``'s data and the final plan's summary."""
    stats: dict = {"final": summary}
    csv_text = None
    if "leaves" in data:
        stats["coverage"], counts = coverage_report(data["leaves"], data["paths"])
        csv_text = per_leaf_csv(data["leaves"], counts)
    if "votes" in data:
        votes = ballots(data["votes"], data.get("missing"), referees)
        stats["agreement"] = agreement_report(votes, data["score_task_types"], referees,
                                              cascade=data.get("cascade", False))
    stats["summary"] = summary_lines(stats)
    return stats, csv_text


def write_reports(ctx, *, summary: dict, referees: list[str], output) -> dict:
    """Compute and write the report files into the stage folder; returns the stats."""
    from processors.quality.plots import write_plots

    folder = Path(ctx.stage_dir)
    data = collect(ctx.load_stage, output)
    stats, csv_text = build_report(data, summary=summary, referees=referees)
    plots = write_plots(folder, data, stats)
    stats["plots"] = plots
    atomic_write_bytes(folder / "stats.json", json.dumps(stats, indent=1, sort_keys=True).encode())
    atomic_write_bytes(folder / "card.md", card_section(stats).encode())
    if csv_text is not None:
        atomic_write_bytes(folder / COVERAGE_CSV, csv_text.encode())
    logger.info("final: quality report written (%s)", "; ".join(stats["summary"][:3]))
    return stats


__all__ = ["build_report", "collect", "write_reports"]
