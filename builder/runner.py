"""The stage runner: shards, resume, fingerprints, failure tables and the accounting check.

For each stage, in pipeline order: compute its fingerprint from its config and the fingerprints of every
stage it reads; if the stage folder holds another fingerprint, clear it (the stage and, through their
fingerprints, every later stage re-run; earlier ones never do); split the input into shards; skip every
shard whose output file exists; run the rest through the engine; split, check, and commit each shard by
renaming its output file last. ``state.json`` is rebuilt from the per-shard stats after every shard.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from tqdm import tqdm

from builder import runfolder as rf
from builder.accounting import FAILURE_SCHEMA, AccountingError, split_shard
from builder.config import ConfigError, dump_config, dump_yaml
from builder.engine import LocalEngine, write_arrow_table
from builder.ids import fingerprint
from builder.outputs import (INTERRUPTED_PREFIX, LIVE_PREFIX, SUPERSEDED_PREFIX, column_values, load_stage_output,
                             run_states, stage_totals)
from builder.stage import Stage, StageContext

logger = logging.getLogger(__name__)

FAILURE_FEATURES = datasets.Features({name: datasets.Value("string") for name in FAILURE_SCHEMA.names})


class StageError(RuntimeError):
    """A stage could not finish; finished shards are kept and a rerun resumes."""




def interrupted_name(folder: Path, index: int, when: float, note: str = "stopped") -> Path:
    """A new ``stats/interrupted-NNNNN-<time>-<note>-<n>.json`` (never one that exists: each is counted)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(when))
    names = (folder / "stats" / f"{INTERRUPTED_PREFIX}{index:05d}-{stamp}-{note}-{n}.json" for n in itertools.count())
    return next(path for path in names if not path.exists())


def adopt_killed_usage(folder: Path) -> None:
    """Turn the live usage records that a killed attempt left behind into interrupted ones (counted in the
    totals), except where the shard did finish: its stats already hold that usage."""
    for live in sorted((folder / "stats").glob(f"{LIVE_PREFIX}*.json")):
        index = int(live.stem.removeprefix(LIVE_PREFIX))
        if (folder / rf.shard_name(index)).exists():
            live.unlink(missing_ok=True)
            continue
        target = interrupted_name(folder, index, live.stat().st_mtime, "killed")
        live.replace(target)
        logger.warning("stage folder %s: shard %d was stopped hard last time; the usage it had recorded is "
                       "counted as spent (%s)", folder.name, index, target.name)


def without_shard_size(config: dict[str, Any]) -> dict[str, Any]:
    """A stage's fingerprinted config minus its ``shard_size``. Like ``run.shard_size`` it only decides how
    the work is cut, so changing it must not re-run finished work; a stage that resumes keeps the boundaries
    recorded in its state (for the row-wise stages they never change a row's output at all)."""
    return {k: v for k, v in config.items() if k != "shard_size"}


@dataclass
class Runner:
    stages: list[Stage]
    config: Any  # builder.config.RunConfig
    run_dir: Path
    dry_run: bool = False
    services: dict[str, Any] = field(default_factory=dict)
    engine: Any = field(default_factory=LocalEngine)
    progress: bool = True
    preflight: Callable[[list[Stage]], None] | None = None  # e.g. check API keys of the stages about to run

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self._by_name = {stage.name: stage for stage in self.stages}
        self._fingerprints = self._compute_fingerprints()

    # -- fingerprints -------------------------------------------------------------------------------
    def stage_config(self, stage: Stage):
        return getattr(self.config.stages, stage.name)

    def reads(self, stage: Stage) -> tuple[str, ...]:
        return tuple(n for n in (stage.upstream, *stage.side_inputs) if n)

    def _compute_fingerprints(self) -> dict[str, str]:
        prints: dict[str, str] = {}
        for stage in self.stages:
            missing = [n for n in self.reads(stage) if n not in prints]
            if missing:
                raise ValueError(f"stage {stage.name!r} reads {missing}, which do not come before it")
            config = self.stage_config(stage)
            try:
                shared = stage.settings_parts(config, self.config)
            except (KeyError, ValueError) as exc:  # e.g. a stage naming an endpoint the config lacks
                raise ConfigError(f"config error: {exc.args[0] if exc.args else exc}") from None
            prints[stage.name] = fingerprint(
                stage.name,
                {n: prints[n] for n in self.reads(stage)},
                without_shard_size(stage.fingerprint_config(config)),
                stage.fingerprint_parts(config),
                shared,
                {"dry_run": self.dry_run},
            )
        return prints

    def fingerprint_of(self, name: str) -> str:
        return self._fingerprints[name]

    def stage_dir(self, name: str) -> Path:
        index = next(i for i, s in enumerate(self.stages) if s.name == name)
        return self.run_dir / rf.stage_dir_name(index, name)

    # -- running ------------------------------------------------------------------------------------
    def run(self, only: set[str] | None = None) -> dict[str, dict]:
        """Run the selected stages (default: all) under the run lock; returns each stage's state."""
        unknown = (only or set()) - set(self._by_name)
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {sorted(unknown)}; the stages are {list(self._by_name)}")
        selected = [stage for stage in self.stages if only is None or stage.name in only]
        if self.preflight is not None:
            self.preflight(selected)
        datasets.disable_progress_bars()  # one progress bar per stage: ours
        states = {}
        with rf.RunLock(self.run_dir):
            self._refuse_mixing_dry_and_paid()
            (self.run_dir / "cache").mkdir(parents=True, exist_ok=True)
            rf.atomic_write_bytes(self.run_dir / "config.yaml", dump_yaml(dump_config(self.config)).encode())
            for stage in selected:
                states[stage.name] = self._run_stage(stage)
        return states

    def _refuse_mixing_dry_and_paid(self) -> None:
        """A dry run must never clear a paid run's stages (their fingerprints differ), nor the reverse."""
        other = [s["stage"] for s in run_states(self.run_dir) if s.get("dry_run", self.dry_run) != self.dry_run]
        if other:
            kind = "a paid run" if self.dry_run else "a dry run"
            raise ConfigError(f"run folder {self.run_dir} holds {kind} (stages {other}); "
                              f"{'--dry-run' if self.dry_run else 'a real run'} may not overwrite it: "
                              "pass another --run-dir")

    def load_stage(self, name: str) -> datasets.Dataset:
        """A finished stage's output, refusing one computed under another fingerprint (stale)."""
        return load_stage_output(self.run_dir, name, expect_fingerprint=self._fingerprints.get(name))

    def _run_stage(self, stage: Stage) -> dict:
        config = self.stage_config(stage)
        folder = self.stage_dir(stage.name)
        fp = self._fingerprints[stage.name]
        previous = self._reuse_or_clear(stage.name, folder, fp)
        if previous and previous.get("done") and all(
                (folder / rf.shard_name(i)).exists() for i in range(previous["shards_total"])):
            logger.info("stage %s: already done under this config; nothing to do", stage.name)
            return previous
        for name in self.reads(stage):
            self.load_stage(name)  # fail early, with a clear message, when an input is missing or stale
        ctx = StageContext(run_dir=self.run_dir, stage_dir=folder, cache_dir=self.run_dir / "cache",
                           dry_run=self.dry_run, settings=self.config, load_stage=self.load_stage,
                           services=self.services)
        inputs = self._inputs(stage, config, ctx, folder)
        key = stage.input_key(config)
        if key not in inputs.column_names:
            raise StageError(f"stage {stage.name!r}: its input has no key column {key!r} ({inputs.column_names})")
        # A resumed stage keeps the shard boundaries it started with: finished shards are only valid for them.
        wanted = config.shard_size or self.config.run.shard_size
        shard_size = (previous or {}).get("shard_size") or wanted
        if shard_size != wanted:
            logger.info("stage %s: resuming with its original shard_size %d (the new one applies to stages that "
                        "start afresh)", stage.name, shard_size)
        features = stage.features(config)
        base = {
            "stage": stage.name, "fingerprint": fp, "dry_run": self.dry_run,
            "reads": {n: self._fingerprints[n] for n in self.reads(stage)},
            "config": dump_config(config), "fingerprint_parts": stage.fingerprint_parts(config),
            "key": stage.key, "input_key": key, "features": features.to_dict(), "shard_size": shard_size,
            "shards_total": max(1, math.ceil(len(inputs) / shard_size)), "rows_in": len(inputs),
        }
        try:
            state = self._run_shards(stage, config, ctx, inputs, key, features, base)
        finally:
            try:
                stage.close(config)
            except Exception:  # noqa: BLE001 - freeing resources must not hide why the stage stopped
                logger.exception("stage %s: releasing its resources failed", stage.name)
        if state["totals"]["rows_in"] != len(inputs):
            raise AccountingError(
                f"stage {stage.name!r}: its shards processed {state['totals']['rows_in']} of {len(inputs)} input "
                f"rows; the stage folder {folder} is inconsistent: delete it and rerun to recompute the stage")
        stage.finalize(config, ctx, load_stage_output(self.run_dir, stage.name, require_done=False))
        return self._write_state(folder, base, done=True)

    def _reuse_or_clear(self, name: str, folder: Path, fp: str) -> dict | None:
        """The stage's previous state when it was computed under the same fingerprint; else an empty folder."""
        state = rf.read_json(folder / rf.STATE_FILE)
        if state is None or state.get("fingerprint") != fp:
            spent = stage_totals(folder, state.get("shards_total", 0))["usage"] if state is not None else {}
            if state is not None:
                logger.info("stage %s: config or inputs changed; recomputing it", name)
            rf.clear_stage_dir(folder)
            if any(spent.values()):  # money paid under the old config stays counted
                (folder / "stats").mkdir(parents=True, exist_ok=True)
                stamp = time.strftime("%Y%m%dT%H%M%S")
                names = (folder / "stats" / f"{SUPERSEDED_PREFIX}{stamp}-{n}.json" for n in itertools.count())
                rf.atomic_write_json(next(p for p in names if not p.exists()), spent)
            return None
        if rf.remove_temporaries(folder):
            logger.info("stage %s: removed the half-written files of an interrupted run", name)
        return state

    def _run_shards(self, stage, config, ctx, inputs, key, features, base) -> dict:
        folder, count = ctx.stage_dir, base["shards_total"]
        adopt_killed_usage(folder)
        state = self._write_state(folder, base, done=False)
        with tqdm(total=len(inputs), initial=state["totals"]["rows_in"], desc=f"{stage.name:>8}", unit="row",
                  disable=not self.progress, dynamic_ncols=True) as bar:
            fn = None  # built on the first shard that needs work: a finished stage loads no model
            for index in range(count):
                if (folder / rf.shard_name(index)).exists():
                    continue
                fn = fn or stage.make_batch_fn(config, ctx)
                shard = inputs.shard(count, index, contiguous=True)
                try:
                    self._run_shard(stage, fn, ctx, shard, index, key, features, base["fingerprint"], bar)
                except BaseException:  # state.json then counts what the stopped attempt paid
                    self._write_state_best_effort(folder, base)
                    raise
                state = self._write_state(folder, base, done=False)
                bar.set_postfix_str(_postfix(state["totals"]), refresh=False)
        return state

    def _inputs(self, stage: Stage, config, ctx: StageContext, folder: Path) -> datasets.Dataset:
        if stage.upstream:
            return self.load_stage(stage.upstream)
        frozen = folder / "input.arrow"
        if not frozen.exists():  # list once per fingerprint, so shard boundaries never move on resume
            rows = stage.source_rows(config, ctx)
            tmp = folder / f"{rf.TMP_PREFIX}input.arrow"
            write_arrow_table(tmp, rows.data.table, rows.features)
            tmp.replace(frozen)
        return datasets.Dataset.from_file(str(frozen))

    def _run_shard(self, stage, fn, ctx, shard, index, key, features, fp, bar) -> None:
        folder = ctx.stage_dir
        ctx.usage.clear()  # usage is counted per shard; the batch function holds this same ctx
        ctx.live_usage_path, ctx._live_written = folder / "stats" / f"{LIVE_PREFIX}{index:05d}.json", None
        started = time.monotonic()
        tmp_map = folder / f"{rf.TMP_PREFIX}map-{index:05d}.arrow"
        try:
            raw = self.engine.run_shard(
                shard,
                fn,
                features=features,
                batch_size=stage.batch_size,
                fingerprint=f"{fp}-{index:05d}",
                tmp_path=tmp_map,
                on_batch=bar.update,
            )
        except BaseException as exc:
            # Requests paid before the stop: their answers are cached, their cost must show. The live record
            # becomes the interrupted one by a rename, so no moment holds both (or neither).
            ctx.note_live_usage(force=True)
            live, ctx.live_usage_path = ctx.live_usage_path, None
            if live.exists():
                live.replace(interrupted_name(folder, index, time.time()))
            if not isinstance(exc, Exception):
                raise
            raise StageError(
                f"stage {stage.name!r} stopped on shard {index} ({len(shard)} rows): {type(exc).__name__}: {exc}. "
                f"Finished shards are kept in {folder}; fix the cause and rerun the same command to resume."
            ) from exc
        split = split_shard(raw, stage.name, column_values(shard, key))
        # Commit order: failures, stats, then the output shard. The output file's presence means "done".
        self._commit(folder / "failures" / rf.shard_name(index), split.failures, FAILURE_FEATURES)
        stats = {
            "shard": index,
            "rows_in": split.rows_in,
            "rows_out": split.rows_out,
            "inputs_with_output": split.inputs_with_output,
            "failed": dict(split.failed),
            "item_failures": dict(split.item_failures),
            "usage": dict(ctx.usage),
            "seconds": round(time.monotonic() - started, 3),
        }
        rf.atomic_write_json(folder / "stats" / f"shard-{index:05d}.json", stats)
        self._commit(folder / rf.shard_name(index), split.output, features)
        ctx.live_usage_path.unlink(missing_ok=True)  # the stats hold it now (a leftover is dropped, see below)
        ctx.live_usage_path = None
        del raw
        tmp_map.unlink(missing_ok=True)

    @staticmethod
    def _commit(path: Path, table, features: datasets.Features) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{rf.TMP_PREFIX}{path.name}")
        write_arrow_table(tmp, table, features)
        rf.fsync_file(tmp)  # whole on disk before it carries the name that means "finished"
        tmp.replace(path)
        rf.fsync_dir(path.parent)

    @staticmethod
    def _write_state(folder: Path, base: dict, *, done: bool) -> dict:
        totals = stage_totals(folder, base["shards_total"])
        state = {**base, "done": done, "shards_done": totals.pop("shards_done"), "totals": totals}
        state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rf.atomic_write_json(folder / rf.STATE_FILE, state)
        return state

    def _write_state_best_effort(self, folder: Path, base: dict) -> None:
        """``_write_state`` while a shard is already failing: a failure to write (a full disk) must not hide
        why it failed, and ``status`` reads the spend records themselves anyway."""
        try:
            self._write_state(folder, base, done=False)
        except OSError as exc:
            logger.warning("stage %s: could not update %s (%s); `taskgalaxy status` still counts what was paid "
                           "from the stats/ records", base["stage"], folder / rf.STATE_FILE, exc)


def _postfix(totals: dict) -> str:
    parts = [f"out={totals['rows_out']}", f"failed={sum(totals['failed'].values())}"]
    if "cost_usd" in totals["usage"]:
        parts.append(f"${totals['usage']['cost_usd']:.2f}")
    return " ".join(parts)
