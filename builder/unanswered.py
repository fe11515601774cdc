"""Rows a server could not answer (``Stage.unanswered_reasons``): a stage holding them is not finished.

The runner commits every shard, then ``check_answered`` raises ``UnansweredError`` (exit 75) with the counts
and the server's words; the next run reopens those shards (``reopen_unanswered``: discarded, their spend kept)
and computes them again, answered rows coming from the request cache. ``--accept-unanswered`` seals them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from builder import runfolder as rf
from builder.arrowfiles import read_arrow_table
from builder.recovery import discard_shard, shard_stats
from builder.stage import Stage, StageError

logger = logging.getLogger(__name__)

EXIT_UNANSWERED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, the same command is to be run again


class UnansweredError(StageError):
    """Every shard of a stage ran, but a server could not answer some of its rows (``Stage.unanswered_reasons``):
    they are no verdict, so the stage is not finished; the next run asks exactly those rows again."""

    exit_code = EXIT_UNANSWERED

    def __init__(self, message: str, stage: str, counts: dict[str, int]):
        super().__init__(message)
        self.stage, self.counts = stage, dict(counts)


def unanswered_by_shard(stage: Stage, folder: Path, shards_total: int) -> dict[int, dict[str, int]]:
    """Finished shards holding failures a server caused (row or item), by reason."""
    reasons = stage.unanswered_reasons
    found: dict[int, dict[str, int]] = {}
    if not reasons:
        return found
    for index, stats in shard_stats(folder).items():
        if index >= shards_total or not (folder / rf.shard_name(index)).exists():
            continue
        counts: dict[str, int] = {}
        for table in ("failed", "item_failures"):
            for reason, n in (stats.get(table) or {}).items():
                if reason in reasons and n:
                    counts[reason] = counts.get(reason, 0) + int(n)
        if counts:
            found[index] = counts
    return found


def reopen_unanswered(stage: Stage, folder: Path, shards_total: int) -> None:
    """Shards a previous run finished with rows its server did not answer are computed again: their
    answered rows come back from the request cache (nothing is paid twice), the others are asked again.
    What they paid stays counted (``discard_shard``)."""
    reopened = unanswered_by_shard(stage, folder, shards_total)
    for index in sorted(reopened):
        discard_shard(folder, index)
    if reopened:
        rows = sum(sum(c.values()) for c in reopened.values())
        logger.info("stage %s: asking again the %d row(s) its server(s) did not answer last time (%d shard(s); "
                    "answers already received come from the request cache)", stage.name, rows, len(reopened))


def warn_sealed_unanswered(stage: Stage, folder: Path, state: dict, later: list[str]) -> None:
    """A stage finished with rows a server did not answer: sealed by ``--accept-unanswered``, or by a version
    before that rule. A finished stage is never reopened by itself (the stages after it, ``later``, read it as
    it is)."""
    sealed = unanswered_by_shard(stage, folder, state["shards_total"])
    if sealed:
        rows = sum(sum(c.values()) for c in sealed.values())
        logger.warning("stage %s: finished with %d row(s) a server did not answer, kept as failures. To ask them "
                       "again, move %s and the folders of the stages after it (%s) aside and rerun: answers "
                       "already received come from the request cache", stage.name, rows, folder,
                       ", ".join(later) or "none")


def check_answered(stage: Stage, folder: Path, base: dict, *, accept: bool,
                   record: Callable[[dict[str, int]], None]) -> None:
    """Refuse to call a stage finished while a server left rows of it unanswered (see ``UnansweredError``);
    ``record`` is given the counts by reason before the error is raised (the runner writes them to the state).
    With ``accept`` they are only warned about and stay failures."""
    by_shard = unanswered_by_shard(stage, folder, base["shards_total"])
    if not by_shard:
        return
    counts: dict[str, int] = {}
    for shard in by_shard.values():
        for reason, n in shard.items():
            counts[reason] = counts.get(reason, 0) + n
    total = sum(counts.values())
    what = ", ".join(f"{reason} x{n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    example = _first_detail(folder, sorted(by_shard), set(counts))
    if accept:
        logger.warning("stage %s: %d row(s) a server did not answer (%s) are kept as failures "
                       "(--accept-unanswered)%s", stage.name, total, what, f"; e.g. {example}" if example else "")
        return
    record(counts)
    raise UnansweredError(
        f"stage {stage.name!r}: {total} of {base['rows_in']} rows got no answer from the server ({what})"
        f"{f'; e.g. {example}' if example else ''}. They are not judged, so the stage is not finished and the "
        f"stages after it did not run. Fix the cause (the server's message above says what it refused) and "
        f"rerun the same command: only these rows are asked again, and answers already received come from "
        f"the request cache (nothing is paid twice). Failures by row: {folder / 'failures'}. To keep them as "
        f"failures instead, rerun with --accept-unanswered.", stage.name, counts)


def _first_detail(folder: Path, shards: list[int], reasons: set[str]) -> str:
    """The first failure detail of ``reasons`` in those shards' failure tables: what the server said."""
    import pyarrow.compute as pc

    for index in shards:
        try:
            table = read_arrow_table(folder / "failures" / rf.shard_name(index))
        except (OSError, ValueError) as exc:  # only an example for the message: never a reason to fail
            logger.debug("could not read the failures of shard %d: %s", index, exc)
            continue
        hits = table.filter(pc.is_in(table["reason"], pa.array(sorted(reasons))))
        if hits.num_rows:
            detail = hits["detail"][0].as_py() or ""
            return f"{hits['reason'][0].as_py()} on {hits['key'][0].as_py()!r}: {detail[:400]}"
    return ""
