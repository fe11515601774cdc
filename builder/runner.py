"""The stage runner: shards, resume, fingerprints, failure tables and the accounting check.

For each stage, in pipeline order: compute its fingerprint from its config and the fingerprints of every
stage it reads; if the stage folder holds another fingerprint, clear it (the stage and, through their
fingerprints, every later stage re-run; earlier ones never do); split the input into shards; skip every
shard whose output file exists and verifies (readable, the row counts its stats recorded: a damaged one is
named and recomputed); run the rest through the engine; split, check, and commit each shard by renaming its
output file last. ``state.json`` is rebuilt from the per-shard stats after every shard, and from them alone
when it is itself damaged. A full disk or a read-only folder stops a stage with ``RunFolderError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from builder import runfolder as rf
from builder.accounting import FAILURE_FEATURES, AccountingError, split_shard
from builder.arrowfiles import write_arrow_table
from builder.config import ConfigError, dump_config, dump_yaml
from builder.engine import LocalEngine, StageStalledError
from builder.fingerprints import stage_fingerprints, stage_reads
from builder.heap import frozen_heap
from builder.live import LIVE_ENDPOINTS
from builder.outputs import (JOURNAL_SUFFIX, LIVE_PREFIX, column_values, load_stage_output, require_intact_stage,
                             shard_problem, stage_totals)
from builder.panel import StagePanel
from builder.runlock import RunLock
from builder.recovery import (RESUME_KEYS, adopt_killed_usage, check_frozen_input, clear_keeping_spend, discard_shard,
                              interrupted_name, readable_states, recover_state)
from builder.stage import Stage, StageContext, StageError
from builder.unanswered import (EXIT_UNANSWERED, UnansweredError, check_answered, reopen_unanswered,
                                warn_sealed_unanswered)
from builder.work import InputOrder, ShardOutcome, ShardTask, StageWork

logger = logging.getLogger(__name__)

__all__ = ["EXIT_UNANSWERED", "Runner", "StageError", "UnansweredError"]  # the last three re-exported


@dataclass
class Runner:
    stages: list[Stage]
    config: Any  # builder.config.RunConfig
    run_dir: Path
    dry_run: bool = False
    services: dict[str, Any] = field(default_factory=dict)
    engine: Any = field(default_factory=LocalEngine)
    progress: bool = True  # a live panel on a terminal (builder.panel), plain log lines elsewhere; False:
    # neither (live.json is still written for ``status --watch``)
    progress_interval: float = 10.0  # seconds between those plain lines
    preflight: Callable[[list[Stage]], None] | None = None  # e.g. check API keys of the stages about to run
    # Services that live as long as one ``run`` (entered after the run lock, closed when it ends): e.g. the
    # LLM accounts, whose admission and breaker every shard and stage of the run share. Their values join
    # ``services`` in every stage's work.
    run_scope: Callable[[], contextlib.AbstractContextManager[dict[str, Any]]] | None = None
    # Seal rows a server could not answer as failures (``--accept-unanswered``) instead of stopping the stage
    # and asking them again on the next run: for a row no fix of the server will ever answer.
    accept_unanswered: bool = False

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self._by_name = {stage.name: stage for stage in self.stages}
        self._verified: set[str] = set()  # stages whose finished shards this run has verified
        self._fingerprints = stage_fingerprints(self.stages, self.config, self.dry_run)
        self._run_services: dict[str, Any] = dict(self.services)

    # -- fingerprints -------------------------------------------------------------------------------
    def stage_config(self, stage: Stage):
        return getattr(self.config.stages, stage.name)

    def reads(self, stage: Stage) -> tuple[str, ...]:
        return stage_reads(stage)

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
        self._verified.clear()
        scope = self.run_scope() if self.run_scope is not None else contextlib.nullcontext({})
        with RunLock(self.run_dir), scope as scoped:
            self._run_services = {**self.services, **scoped}
            try:
                self._refuse_mixing_dry_and_paid()
                self._write_run_files()
                for stage in selected:
                    states[stage.name] = self._run_stage(stage)
                    self._verified.add(stage.name)  # its own run verified (or recomputed) every shard
            finally:
                self._run_services = dict(self.services)
        return states

    def _write_run_files(self) -> None:
        try:
            (self.run_dir / "cache").mkdir(parents=True, exist_ok=True)
            rf.atomic_write_bytes(self.run_dir / "config.yaml", dump_yaml(dump_config(self.config, as_given=True)).encode())
        except OSError as exc:
            raise rf.folder_error(exc, doing="write the run's config.yaml before any stage ran",
                                  path=self.run_dir / "config.yaml", run_dir=self.run_dir,
                                  exit_code=rf.EXIT_UNUSABLE) from None

    def _refuse_mixing_dry_and_paid(self) -> None:
        """A dry run must never clear a paid run's stages (their fingerprints differ), nor the reverse."""
        other = [s["stage"] for s in readable_states(self.run_dir) if s.get("dry_run", self.dry_run) != self.dry_run]
        if other:
            kind = "a paid run" if self.dry_run else "a dry run"
            raise ConfigError(f"run folder {self.run_dir} holds {kind} (stages {other}); "
                              f"{'--dry-run' if self.dry_run else 'a real run'} may not overwrite it: "
                              "pass another --run-dir")

    def load_stage(self, name: str) -> datasets.Dataset:
        """A finished stage's output, refusing one computed under another fingerprint (stale) or one with a
        damaged shard (that stage's rerun recomputes it)."""
        if name not in self._verified:  # once per run: a stage read by several is not re-verified by each
            require_intact_stage(self.run_dir, name)
            self._verified.add(name)
        return load_stage_output(self.run_dir, name, expect_fingerprint=self._fingerprints.get(name))

    def stage_work(self, name: str) -> StageWork:
        """Stage ``name``'s work as plain data: what an engine runs, in this process or any other."""
        stage = self._by_name[name]
        return StageWork(stage=stage, config=self.stage_config(stage), settings=self.config, run_dir=self.run_dir,
                         stage_dir=self.stage_dir(name), cache_dir=self.run_dir / "cache", dry_run=self.dry_run,
                         services=dict(self._run_services),
                         reads={n: self._fingerprints[n] for n in self.reads(stage)})

    def _run_stage(self, stage: Stage) -> dict:
        """Run one stage; a full disk, a read-only folder or the like stops it with a ``RunFolderError`` that
        names the stage, the file and the fix (finished shards are kept either way)."""
        folder = self.stage_dir(stage.name)
        try:
            return self._run_stage_in(stage, folder)
        except StageError as exc:  # the batch function hit the disk's limit, not a bug of its own
            if isinstance(exc.__cause__, rf.RunFolderError):  # a damaged file of the run met in a shard (its cache)
                raise exc.__cause__ from None
            if exc.__cause__ is None or not rf.is_run_folder_problem(exc.__cause__, self.run_dir):
                raise
            raise rf.folder_error(exc.__cause__, doing="write a shard", path=folder, stage=stage.name,
                                  run_dir=self.run_dir) from exc.__cause__
        except OSError as exc:
            if not rf.is_run_folder_problem(exc, self.run_dir):
                raise
            raise rf.folder_error(exc, doing="write its results", path=folder, stage=stage.name,
                                  run_dir=self.run_dir) from exc

    def _run_stage_in(self, stage: Stage, folder: Path) -> dict:
        config = self.stage_config(stage)
        fp = self._fingerprints[stage.name]
        previous = self._reuse_or_clear(stage.name, folder, fp)
        # A finished stage stays as it was sealed (its rows a server did not answer, if any, included): only a
        # damaged shard of it is recomputed. The stages after it read it as it is.
        sealed = bool(previous and previous.get("done"))
        if previous and previous.get("done") and not self._discard_damaged_shards(stage.name, folder, previous) \
                and all((folder / rf.shard_name(i)).exists() for i in range(previous["shards_total"])):
            logger.info("stage %s: already done under this config; nothing to do", stage.name)
            if not self.accept_unanswered:
                later = [s.name for s in self.stages[self.stages.index(stage) + 1:]]
                warn_sealed_unanswered(stage, folder, previous, later)
            return previous
        for name in self.reads(stage):
            self.load_stage(name)  # fail early, with a clear message, when an input is missing or stale
        work = self.stage_work(stage.name)
        ctx = dataclasses.replace(work.context(), load_stage=self.load_stage)  # the runner's own, verifying reads
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
        stalled = False
        try:
            state = self._run_shards(stage, config, work, inputs, key, features, base, reopen=not sealed)
        except StageStalledError:
            stalled = True  # its shard's thread is still inside the batch function: leave what it uses alone
            raise
        finally:
            try:
                if not stalled:
                    stage.close(config)
            except Exception:  # noqa: BLE001 - freeing resources must not hide why the stage stopped
                logger.exception("stage %s: releasing its resources failed", stage.name)
        if state["totals"]["rows_in"] != len(inputs):
            raise AccountingError(
                f"stage {stage.name!r}: its shards processed {state['totals']['rows_in']} of {len(inputs)} input "
                f"rows; the stage folder {folder} is inconsistent: delete it and rerun to recompute the stage")
        if not sealed:
            check_answered(stage, folder, base, accept=self.accept_unanswered,
                           record=lambda counts: self._write_state_best_effort(folder, {**base, "unanswered": counts}))
        try:
            stage.finalize(config, ctx, load_stage_output(self.run_dir, stage.name, require_done=False))
        except OSError as exc:
            if not rf.is_run_folder_problem(exc, self.run_dir):
                raise
            raise rf.folder_error(exc, doing="finish the stage (finalize: its summary files) after all its shards "
                                  "were written", path=folder, stage=stage.name, run_dir=self.run_dir) from exc
        return self._write_state(folder, base, done=True)

    def _reuse_or_clear(self, name: str, folder: Path, fp: str) -> dict | None:
        """The stage's previous state when it was computed under the same fingerprint; else an empty folder."""
        try:
            state = rf.read_json(folder / rf.STATE_FILE)
        except rf.CorruptFileError as exc:
            return recover_state(name, folder, fp, exc)
        if state is None or state.get("fingerprint") != fp:
            spent = stage_totals(folder, state.get("shards_total", 0))["usage"] if state is not None else {}
            if state is not None:
                logger.info("stage %s: config or inputs changed; recomputing it", name)
            clear_keeping_spend(folder, spent)
            return None
        if rf.remove_temporaries(folder):
            logger.info("stage %s: removed the half-written files of an interrupted run", name)
        return state

    def _discard_damaged_shards(self, name: str, folder: Path, state: dict) -> int:
        """Verify every finished shard a resume would skip (see ``builder.outputs.shard_problem``); remove each
        that does not verify, so it is recomputed. Returns how many were removed."""
        discarded = 0
        for index in range(state["shards_total"]):
            if not (folder / rf.shard_name(index)).exists():
                continue
            problem = shard_problem(folder, index, fingerprint=state.get("fingerprint"))
            if problem is not None:
                logger.warning("stage %s: finished shard %d cannot be trusted (%s); recomputing it", name, index,
                               problem)
                discard_shard(folder, index)
                discarded += 1
        return discarded

    def _run_shards(self, stage, config, work: StageWork, inputs, key, features, base, *, reopen: bool = True) -> dict:
        folder, count, fp = work.stage_dir, base["shards_total"], base["fingerprint"]
        adopt_killed_usage(folder)  # first: it drops the stale journals of finished shards, which stats hold
        self._discard_damaged_shards(stage.name, folder, base)
        if reopen and not self.accept_unanswered:
            reopen_unanswered(stage, folder, base["shards_total"])
        resume = {name: base[name] for name in RESUME_KEYS}  # in every shard's stats: a lost state.json rebuilds
        state = self._write_state(folder, base, done=False)
        pending = {index: ShardTask(index=index, rows=inputs.shard(count, index, contiguous=True),
                                    fingerprint=f"{fp}-{index:05d}",
                                    tmp_path=folder / f"{rf.TMP_PREFIX}map-{index:05d}.arrow",
                                    journal_path=folder / "stats" / f"{LIVE_PREFIX}{index:05d}{JOURNAL_SUFFIX}")
                   for index in range(count) if not (folder / rf.shard_name(index)).exists()}
        for task in pending.values():
            task.journal_path.unlink(missing_ok=True)  # adopted at the start of the stage if a kill left one
        panel = StagePanel(stage.name, folder, shards_total=count, rows_total=len(inputs),
                           rows_done=state["totals"]["rows_in"], usage=state["totals"]["usage"],
                           endpoints=self._run_services.get(LIVE_ENDPOINTS), interval=self.progress_interval,
                           mode="auto" if self.progress else "off")
        settle = stage.make_settle_fn(config, work.context()) if pending else None
        in_order = InputOrder(pending, settle)
        with panel, frozen_heap(sum(len(task.rows) for task in pending.values())):
            outcomes = self.engine.run_shards(work, list(pending.values()), features=features,
                                              batch_size=stage.batch_size, in_flight=stage.shards_in_flight(config),
                                              on_rows=panel.rows)
            try:
                with contextlib.closing(outcomes):  # leaving early stops the shards still in flight
                    for outcome in outcomes:  # in the order they finish
                        if outcome.error is not None:
                            self._stopped(stage, folder, pending[outcome.index], outcome)
                        for ready in in_order.arrived(outcome):  # with a settle step: in input order
                            self._commit_shard(stage, folder, pending[ready.index], ready, key, features, resume)
                            del pending[ready.index]
                            state = self._write_state(folder, base, done=False)
                            panel.committed(state)
            except BaseException:
                # Requests paid by the shards that did not finish: their answers are cached, their cost must
                # show. Each journal becomes an interrupted record by a rename, so no moment holds both (or
                # neither), and a full disk cannot stop it; state.json then counts it.
                for task in pending.values():
                    try:
                        if (folder / rf.shard_name(task.index)).exists():  # committed just before the stop:
                            task.journal_path.unlink(missing_ok=True)  # its stats hold this spend
                        elif task.journal_path.exists():
                            task.journal_path.replace(interrupted_name(folder, task.index, time.time()))
                    except FileNotFoundError:  # taken meanwhile (a worker kept a retried attempt's journal)
                        pass
                self._write_state_best_effort(folder, base)
                raise
        return state

    @staticmethod
    def _stopped(stage: Stage, folder: Path, task: ShardTask, outcome: ShardOutcome) -> None:
        if outcome.unrecorded:
            logger.error("stage %s shard %d: %s paid after the spend journal stopped taking writes could not be "
                         "recorded; `status` under-counts this stage by that much", stage.name, task.index,
                         ", ".join(f"{k}={v:g}" for k, v in sorted(outcome.unrecorded.items())))
        exc = outcome.error
        raise StageError(
            f"stage {stage.name!r} stopped on shard {task.index} ({len(task.rows)} rows): {type(exc).__name__}: "
            f"{str(exc).rstrip('.')}. Finished shards are kept in {folder}; fix the cause and rerun the same command to resume."
        ) from exc

    def _inputs(self, stage: Stage, config, ctx: StageContext, folder: Path) -> datasets.Dataset:
        if stage.upstream:
            return self.load_stage(stage.upstream)
        frozen = folder / "input.arrow"
        check_frozen_input(stage.name, folder, frozen)
        if not frozen.exists():  # list once per fingerprint, so shard boundaries never move on resume
            rows = stage.source_rows(config, ctx)
            tmp = folder / f"{rf.TMP_PREFIX}input.arrow"
            write_arrow_table(tmp, rows.data.table, rows.features)
            tmp.replace(frozen)
        return datasets.Dataset.from_file(str(frozen))

    def _commit_shard(self, stage: Stage, folder: Path, task: ShardTask, outcome: ShardOutcome, key: str,
                      features: datasets.Features, resume: dict) -> None:
        split = split_shard(outcome.table(), stage.name, column_values(task.rows, key))
        # Commit order: failures, stats, then the output shard. The output file's presence means "done".
        self._commit(folder / "failures" / rf.shard_name(task.index), split.failures, FAILURE_FEATURES)
        stats = {
            "shard": task.index,
            "rows_in": split.rows_in,
            "rows_out": split.rows_out,
            "inputs_with_output": split.inputs_with_output,
            "failed": dict(split.failed),
            "item_failures": dict(split.item_failures),
            "usage": dict(outcome.usage),
            "seconds": outcome.seconds,
            # Wall-clock times: ``status`` counts shards that ran side by side once; and two attempts of one
            # shard never write the same bytes (``discard_shard`` names what it keeps of one by their digest).
            "started": round(time.time() - outcome.seconds, 3),
            "finished": time.time(),
            **resume,
        }
        rf.atomic_write_json(folder / "stats" / f"shard-{task.index:05d}.json", stats)
        self._commit(folder / rf.shard_name(task.index), split.output, features)
        task.journal_path.unlink(missing_ok=True)  # the stats hold it now (a leftover is dropped, see above)
        del split
        outcome.release()
        task.tmp_path.unlink(missing_ok=True)

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

