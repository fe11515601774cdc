"""What a stopped or damaged stage folder leaves behind, and how a resume takes it back.

The spend of attempts that stopped (journals renamed to ``stats/interrupted-*``), the spend of a config that
was replaced (``stats/superseded-*``), shards that no longer verify (discarded, their spend kept), and the
per-shard stats a damaged ``state.json`` is rebuilt from. ``builder.runner`` calls these; ``builder.outputs``
reads the records back (``stage_totals``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import pyarrow as pa

from builder import runfolder as rf
from builder.outputs import (INTERRUPTED_PREFIX, JOURNAL_SUFFIX, LIVE_PREFIX, SUPERSEDED_PREFIX, arrow_rows,
                             stage_totals)

logger = logging.getLogger(__name__)


def interrupted_name(folder: Path, index: int, when: float, note: str = "stopped") -> Path:
    """A new ``stats/interrupted-NNNNN-<time>-<note>-<n>.jsonl`` (never one that exists: each is counted)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(when))
    names = (folder / "stats" / f"{INTERRUPTED_PREFIX}{index:05d}-{stamp}-{note}-{n}{JOURNAL_SUFFIX}"
             for n in itertools.count())
    return next(path for path in names if not path.exists())


def adopt_killed_usage(folder: Path) -> None:
    """Turn the spend journals that a killed attempt left behind into interrupted ones (counted in the
    totals), except where the shard did finish: its stats already hold that usage. A rename, so it needs no
    disk space (a run stopped by a full disk resumes with its spend intact)."""
    for live in sorted((folder / "stats").glob(f"{LIVE_PREFIX}*.json*")):
        index = int(live.name.removeprefix(LIVE_PREFIX).split(".")[0])
        if (folder / rf.shard_name(index)).exists():
            live.unlink(missing_ok=True)
            continue
        target = interrupted_name(folder, index, live.stat().st_mtime, "killed").with_suffix(live.suffix)
        live.replace(target)
        logger.warning("stage folder %s: shard %d was stopped hard last time; the usage it had recorded is "
                       "counted as spent (%s)", folder.name, index, target.name)


RESUME_KEYS = ("fingerprint", "shard_size", "shards_total")  # copied into every shard's stats (see recover_state)


def discard_shard(folder: Path, index: int) -> None:
    """Remove a finished shard that does not verify, so the resume recomputes it. What its stats say it paid
    stays counted: first an interrupted record named after those stats (a redo after a kill rewrites the same
    record rather than adding one), then the output file (its presence meant "finished"), then the rest."""
    stats_path = folder / "stats" / f"shard-{index:05d}.json"
    try:
        data = stats_path.read_bytes()
        usage = json.loads(data).get("usage") or {}
    except (OSError, ValueError, AttributeError):  # missing or damaged: what it paid is not known
        data, usage = b"", {}
    if usage:
        digest = hashlib.sha256(data).hexdigest()[:16]
        record = folder / "stats" / f"{INTERRUPTED_PREFIX}{index:05d}-discarded-{digest}{JOURNAL_SUFFIX}"
        rf.atomic_write_bytes(record, (json.dumps(usage, sort_keys=True) + "\n").encode())
    (folder / rf.shard_name(index)).unlink(missing_ok=True)
    (folder / "failures" / rf.shard_name(index)).unlink(missing_ok=True)
    stats_path.unlink(missing_ok=True)
    for live in (folder / "stats").glob(f"{LIVE_PREFIX}{index:05d}.*"):
        if usage:  # its stats held that usage (now in the record above)
            live.unlink(missing_ok=True)
        else:  # the stats were unreadable: the journal is the only record of what the shard paid
            live.replace(interrupted_name(folder, index, live.stat().st_mtime, "discarded").with_suffix(live.suffix))


def shard_stats(folder: Path) -> dict[int, dict]:
    """Every per-shard stats record that parses, by shard index."""
    records = {}
    for path in sorted((folder / "stats").glob("shard-*.json")):
        index = path.stem.removeprefix("shard-")
        try:
            record = rf.read_json(path)
        except rf.CorruptFileError:
            continue
        if index.isdigit() and isinstance(record, dict):
            records[int(index)] = record
    return records


def spent_in(folder: Path, records: dict[int, dict]) -> dict | None:
    """What a stage folder recorded as spent, when its state.json is gone: ``stage_totals`` over every shard
    index that has a record or an output file; None when a damaged record makes it unknown."""
    indexes = [*records, *(int(p.stem.removeprefix("shard-")) for p in folder.glob("shard-*.arrow")
                           if p.stem.removeprefix("shard-").isdigit())]
    try:
        return stage_totals(folder, max(indexes, default=-1) + 1)["usage"]
    except rf.CorruptFileError:
        return None


def clear_keeping_spend(folder: Path, spent: dict) -> None:
    """Empty a stage folder for a recompute; money paid in it stays counted, as a superseded record."""
    rf.clear_stage_dir(folder)
    if any(spent.values()):
        (folder / "stats").mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        names = (folder / "stats" / f"{SUPERSEDED_PREFIX}{stamp}-{n}.json" for n in itertools.count())
        rf.atomic_write_json(next(p for p in names if not p.exists()), spent)


def readable_states(run_dir: Path) -> list[dict]:
    """``run_states`` minus the stages whose state.json is damaged: each one's own turn rebuilds or refuses it."""
    states = []
    for folder in sorted(Path(run_dir).glob("[0-9][0-9]_*")):
        try:
            state = rf.read_json(folder / rf.STATE_FILE)
        except rf.CorruptFileError:
            continue
        if state is not None:
            states.append({**state, "folder": folder.name})
    return states


def check_frozen_input(name: str, folder: Path, frozen: Path) -> None:
    """A damaged input listing is listed again when no shard was cut from it yet; else the stage stops."""
    if not frozen.exists():
        return
    try:
        arrow_rows(frozen)
        return
    except (pa.ArrowException, OSError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    finished = list(folder.glob("shard-*.arrow"))
    if not finished:
        logger.warning("stage %s: its input listing %s is damaged (%s); listing the inputs again", name,
                       frozen, problem)
        frozen.unlink()
        return
    raise rf.RunFolderError(
        f"stage {name!r}: its frozen input listing {frozen} is damaged ({problem}), and {len(finished)} finished "
        f"shards were cut from it, so it cannot be listed again without moving their boundaries. Move {folder} "
        "aside and rerun the same command to list and compute the stage afresh.", rf.EXIT_DATA)


def recover_state(name: str, folder: Path, fp: str, damage: rf.CorruptFileError) -> dict | None:
    """``state.json`` does not parse. Rebuild what a resume needs from the shard stats written under this
    fingerprint; when there are none, recompute the stage — unless that would throw paid work away."""
    logger.warning("%s", damage)
    records = shard_stats(folder)
    layouts = {tuple(r.get(k) for k in RESUME_KEYS) for r in records.values() if r.get("fingerprint") == fp}
    if len(layouts) == 1 and None not in (layout := layouts.pop()):
        rebuilt = {"stage": name, "done": False, **dict(zip(RESUME_KEYS, layout))}
        logger.warning("stage %s: rebuilt its state from the stats of its finished shards; every one is "
                       "verified before it is kept", name)
        return rebuilt
    finished = sorted(folder.glob("shard-*.arrow"))
    spent = spent_in(folder, records)
    if finished and (spent is None or spent.get("cost_usd") or spent.get("requests")):
        paid = "an unknown amount" if spent is None else \
            f"{spent.get('requests', 0):g} requests (${spent.get('cost_usd', 0):.2f})"
        raise rf.RunFolderError(
            f"stage {name!r}: {folder / rf.STATE_FILE} is damaged and cannot be rebuilt: the stats of its "
            f"{len(finished)} finished shards do not say which config they were computed under (they predate "
            f"that record), and they paid {paid}. Nothing was recomputed. Restore the file from a backup; or, "
            f"to recompute the stage (answers in the request cache are not paid again), move {folder} aside "
            "and rerun the same command.", rf.EXIT_DATA)
    logger.warning("stage %s: no shard of it can be matched to this config; recomputing it (what it had "
                   "recorded as spent stays counted)", name)
    clear_keeping_spend(folder, spent)
    return None
