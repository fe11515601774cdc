"""Shard work that travels: what a stage's shards need, as plain data, and the function that runs one shard.

The runner describes a stage's work once (``StageWork``: the stage, its config, the run config, the folders,
the dry-run flag, the services and the fingerprints of what it reads) and each pending shard (``ShardTask``).
Both pickle (cloudpickle, for a subprocess or a Ray worker); nothing in them points back at the runner. Where
the work runs, ``StageWork.build`` makes the batch function once per process (or actor, or GPU), and
``execute_shard`` runs one shard through it under its own usage meter, returning the rows, the in-band
failures *and* the usage together (``ShardOutcome``). The runner alone names, checks and commits shards.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import datasets
import pyarrow as pa

from builder.arrowfiles import read_arrow_table
from builder.outputs import load_stage_output
from builder.rows import INBAND_COLUMNS
from builder.stage import BatchFn, SettleFn, ShardScope, Stage, StageConfig, StageContext, UsageMeter, shard_scope

logger = logging.getLogger(__name__)


def load_finished_stage(run_dir: Path, fingerprints: dict[str, str], name: str) -> datasets.Dataset:
    """A side input where the work runs: the finished stage's output, refused when its fingerprint is not the
    one the runner checked (a stale folder). Module-level, so the partial of it pickles."""
    if name not in fingerprints:
        raise KeyError(f"stage output {name!r} is not among the inputs this stage declares ({sorted(fingerprints)})")
    return load_stage_output(run_dir, name, expect_fingerprint=fingerprints[name])


@dataclass(frozen=True)
class StageWork:
    """A stage's work, described by data: enough to build its batch function in any process."""

    stage: Stage
    config: StageConfig
    settings: Any  # the validated run config
    run_dir: Path
    stage_dir: Path
    cache_dir: Path
    dry_run: bool
    services: dict[str, Any]
    reads: dict[str, str]  # every stage it reads -> the fingerprint it must have

    def context(self) -> StageContext:
        return StageContext(run_dir=self.run_dir, stage_dir=self.stage_dir, cache_dir=self.cache_dir,
                            dry_run=self.dry_run, settings=self.settings, services=dict(self.services),
                            load_stage=functools.partial(load_finished_stage, self.run_dir, dict(self.reads)))

    def build(self) -> BatchFn:
        """The batch function, built here: models load, clients connect, side inputs are read once."""
        self.stage_dir.mkdir(parents=True, exist_ok=True)  # a stage may keep files there (a ledger, a report)
        return self.stage.make_batch_fn(self.config, self.context())


@dataclass
class ShardTask:
    """One pending shard: its input rows and where its temporary output and spend journal go."""

    index: int
    rows: datasets.Dataset
    fingerprint: str  # of the shard's map output (the stage fingerprint and the index)
    tmp_path: Path  # the raw output (rows + in-band failures), an Arrow file the runner reads and removes
    journal_path: Path  # the shard's spend journal, ``stats/live-NNNNN.jsonl``


@dataclass
class ShardOutcome:
    """What came back from one shard: its raw output (or the error that stopped it) and its usage."""

    index: int
    usage: dict[str, float]
    unrecorded: dict[str, float]  # paid but not journalled (the disk was full)
    seconds: float
    table_path: Path | None = None
    error: BaseException | None = None
    _table: pa.Table | None = field(default=None, repr=False)

    def table(self) -> pa.Table:
        if self._table is None:
            self._table = read_arrow_table(self.table_path)
        return self._table

    def release(self) -> None:
        """Drop the rows (a memory map of ``table_path``) so the file can go."""
        self._table = None

    def settled(self, table: pa.Table, usage: dict[str, float]) -> None:
        """Take the stage's settle step's table (committed instead of the raw one) and count its usage."""
        self._table = table
        for name, value in usage.items():
            self.usage[name] = self.usage.get(name, 0) + value

    def __getstate__(self) -> dict:  # across processes the file travels by name, not the rows by value
        state = dict(self.__dict__)
        if state.get("table_path") is not None:
            state["_table"] = None
        return state


class InputOrder:
    """Hands the runner finished shards to commit. Without a settle step (``Stage.make_settle_fn``) each one as
    it arrives; with one, in input order: a shard that finishes before those ahead of it waits (its raw table
    stays a file, nothing is held in memory), and each is settled just before its commit. A shard that stops
    the stage leaves the ones waiting behind it uncommitted: the next run computes them again."""

    def __init__(self, pending: dict[int, ShardTask], settle: SettleFn | None):
        self.settle = settle
        self.order = sorted(pending)
        self.waiting: dict[int, ShardOutcome] = {}

    def arrived(self, outcome: ShardOutcome) -> Iterator[ShardOutcome]:
        if self.settle is None:
            yield outcome
            return
        self.waiting[outcome.index] = outcome
        while self.order and self.order[0] in self.waiting:
            ready = self.waiting.pop(self.order.pop(0))
            ready.settled(*self.settle(ready.table()))
            yield ready


def inband_features(features: datasets.Features) -> datasets.Features:
    """The stage's output features plus the runner's in-band columns (all strings)."""
    extended = datasets.Features(dict(features))
    for column in INBAND_COLUMNS:
        extended[column] = datasets.Value("string")
    return extended


def execute_shard(fn: BatchFn, task: ShardTask, *, features: datasets.Features, batch_size: int | None,
                  on_rows: Callable[[int], None] | None = None, stop=None) -> ShardOutcome:
    """Run one shard through ``fn`` with ``Dataset.map`` under a fresh usage meter (journal at
    ``task.journal_path``). Never raises for the shard's own errors: they come back in the outcome, with the
    usage paid up to that point; a stop (Ctrl-C, SIGTERM) is re-raised after the journal is closed."""
    meter = UsageMeter(task.journal_path)
    scope = ShardScope(meter) if stop is None else ShardScope(meter, stop)
    started = time.monotonic()
    full = inband_features(features)
    table, path, error = None, None, None
    try:
        with shard_scope(scope):
            if len(task.rows) == 0:
                table = full.arrow_schema.empty_table()
            else:
                table, path = _map(fn, task, full, batch_size, on_rows), task.tmp_path
    except Exception as exc:  # noqa: BLE001 - reported with the outcome; the runner names the shard
        error = exc
    finally:
        meter.close()
    return ShardOutcome(index=task.index, usage=dict(meter.usage), unrecorded=dict(meter.unrecorded),
                        seconds=round(time.monotonic() - started, 3), table_path=path, error=error, _table=table)


def _map(fn: BatchFn, task: ShardTask, full: datasets.Features, batch_size: int | None,
         on_rows: Callable[[int], None] | None) -> pa.Table:
    """``Dataset.map`` writes under the temporary name and fingerprint we give (closures holding clients or
    models do not hash)."""
    shard = task.rows

    def counted(batch: dict[str, list]) -> dict[str, list]:
        result = fn(batch)
        if on_rows is not None:
            on_rows(len(next(iter(batch.values()))) if batch else 0)
        return result

    mapped = shard.map(counted, batched=True, batch_size=batch_size or len(shard),
                       remove_columns=shard.column_names, features=full, new_fingerprint=task.fingerprint,
                       cache_file_name=str(task.tmp_path), load_from_cache_file=False, desc=None)
    return mapped.data.table


class Engine(Protocol):
    """Runs a stage's pending shards and yields each outcome as it finishes (in any order). Closing the
    iterator early (the runner stops) must stop the shards still running and return once they have."""

    name: str

    def run_shards(self, work: StageWork, tasks: Iterable[ShardTask], *, features: datasets.Features,
                   batch_size: int | None, in_flight: int,
                   on_rows: Callable[[int], None] | None = None) -> Iterator[ShardOutcome]: ...


def run_pickled(payload: bytes) -> bytes:
    """Run one shard from ``cloudpickle.dumps((work, task, features, batch_size))`` and return the pickled
    outcome: the entry point of another process (a spawned subprocess here; a Ray worker does the same)."""
    import cloudpickle

    work, task, features, batch_size = cloudpickle.loads(payload)
    outcome = execute_shard(work.build(), task, features=features, batch_size=batch_size)
    return cloudpickle.dumps(outcome)
