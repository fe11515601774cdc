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

import pyarrow.compute as pc

from builder.outputs import column_values
from builder.runfolder import atomic_write_bytes
from processors.quality.agreement import agreement_report
from processors.quality.coverage import coverage_report, per_leaf_csv
from processors.quality.report_text import card_section, summary_lines

logger = logging.getLogger(__name__)

COVERAGE_CSV = "coverage_per_leaf.csv"


def _list_field(dataset, column: str, field: str | None = None) -> list:
    """Every element of a list column (or one field of its structs), flattened, read through Arrow: the match
    stage holds top-k dicts per image (8 M of them at the paper's scale), too many to build as Python dicts."""
    array = dataset.data.column(column).combine_chunks()
    flat = pc.list_flatten(array)
    if field is not None:
        flat = pc.struct_field(flat, field)
    return flat.to_pylist()


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
    paths = {}
    if match is not None:
        paths["match"] = _list_field(match, "candidates", "task_type")
        data["clip_scores"] = _list_field(match, "candidates", "score")
        data["clip_top1"] = [c[0]["score"] for c in column_values(match, "candidates") if c] \
            if len(match) < 200_000 else []
    if filt is not None:
        paths["filter"] = _list_field(filt, "task_types")
    if qa is not None:
        paths["qa"] = column_values(qa, "task_type")
    if score is not None:
        paths["score"] = column_values(score, "task_type")
        data["votes"] = column_values(score, "votes")
        data["score_task_types"] = paths["score"]
    paths["final"] = column_values(final, "task_type")
    data["paths"] = paths
    data["final_votes_total"] = column_values(final, "votes_total")
    if images is not None:
        source_of = dict(zip(column_values(images, "image_id"), column_values(images, "source")))
        data["kept_sources"] = [source_of.get(i, "?") for i in column_values(final, "image_id")]
    return data


def build_report(data: dict, *, summary: dict, referees: list[str]) -> tuple[dict, str | None]:
    """(stats, per-leaf CSV text) from ``collect``'s data and the final plan's summary."""
    stats: dict = {"final": summary}
    csv_text = None
    if "leaves" in data:
        stats["coverage"], counts = coverage_report(data["leaves"], data["paths"])
        csv_text = per_leaf_csv(data["leaves"], counts)
    if "votes" in data:
        votes = [{name: v.get(name) for name in referees} for v in data["votes"]]
        stats["agreement"] = agreement_report(votes, data["score_task_types"], referees)
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
