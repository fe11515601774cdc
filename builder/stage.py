"""A stage: a name, a typed config and a batch function over rows.

The runner (``builder.runner``) knows nothing about what a stage does; a stage knows nothing about shards,
resume or the run folder. A stage reads its *primary* input (the upstream stage's output, or rows it lists
itself from its config when it is a source stage) and may read any other finished stage as a side input
through ``StageContext.load_stage``; every stage it reads is declared in ``reads`` so that its fingerprint
changes whenever one of them changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

BatchFn = Callable[[dict[str, list]], dict[str, list]]
# A shard's raw table (rows + in-band failures) -> the table to commit and the usage the step counted.
SettleFn = Callable[["pa.Table"], "tuple[pa.Table, dict[str, float]]"]


logger = logging.getLogger(__name__)

class StageError(RuntimeError):
    """A stage could not finish; finished shards are kept and a rerun resumes."""


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Left out of dumps when unset, so config.yaml and the dataset card show it only where it was given.
    shard_size: int | None = Field(
        None, ge=1, exclude_if=lambda value: value is None,
        description="input rows per shard for this stage (default run.shard_size): larger for fast GPU stages, "
        "whose per-shard start-up then matters less; smaller for paid stages, so less is at risk")


class Heartbeat:
    """A shard's last sign of life, for the engine's stall watchdog (``builder.engine``): rows finished, a model
    batch done, an LLM reply billed or read from the cache. Any thread may beat (LLM replies are counted on the
    accounts' loop thread); the watchdog reads ``last``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()


_HEARTBEAT: contextvars.ContextVar[Heartbeat | None] = contextvars.ContextVar("taskgalaxy_heartbeat", default=None)


@contextlib.contextmanager
def heartbeat_scope(heartbeat: Heartbeat) -> Iterator[Heartbeat]:
    """Work run under this (the engine runs each shard under one) beats ``heartbeat``: through ``beat()`` on
    this thread, and through every ``UsageMeter`` made here, from any thread."""
    token = _HEARTBEAT.set(heartbeat)
    try:
        yield heartbeat
    finally:
        _HEARTBEAT.reset(token)


def beat() -> None:
    """A sign of life of the shard running on this thread (a no-op outside one): for work that finishes no row
    for a long while - a model batch of a stage that takes the whole shard in one call, say."""
    heartbeat = _HEARTBEAT.get()
    if heartbeat is not None:
        heartbeat.beat()


class UsageMeter:
    """The usage of one shard (requests, tokens, cost, cache hits...) and its spend journal on disk.

    Built where the shard runs (this process, a subprocess, a Ray worker) and returned *with the shard's
    results*; the journal (``stats/live-NNNNN.jsonl``) gets one line per ``add``, appended before ``add``
    returns, so money spent by an attempt that is killed (SIGKILL, OOM, power) still shows after the resume,
    to the last reply. Thread-safe: the LLM engine counts from its event-loop thread while the stage's own
    code counts from the shard's thread."""

    def __init__(self, path: Path | None = None):
        self.path = path
        # Each ``add`` is a sign of life of the shard that made this meter (a reply billed, cache hits read),
        # from whichever thread counts it: the engine's stall watchdog listens (``heartbeat_scope``).
        self.heartbeat = _HEARTBEAT.get()
        self.usage: dict[str, float] = {}
        self.unrecorded: dict[str, float] = {}  # usage the journal could not take (disk full)
        self._fd: int | None = None
        self._fd_path: Path | None = None
        self._warned = False
        self._lock = threading.Lock()

    def add(self, **counters: float) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()
        with self._lock:
            for name, value in counters.items():
                self.usage[name] = self.usage.get(name, 0) + value
            if self.path is not None and counters:
                self._journal_line(counters)

    def _journal_line(self, counters: dict[str, float]) -> None:
        line = (json.dumps(counters, separators=(",", ":")) + "\n").encode()
        try:
            if self._fd is None or self._fd_path != self.path:
                self._close()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._fd_path = self.path
            # One write of a short line to an O_APPEND file: in the kernel once it returns, so a killed
            # process loses nothing; a torn last line (power loss) is skipped by the reader.
            written = os.write(self._fd, line)
            if written != len(line):  # a nearly full disk: end the fragment so the next line stands alone
                os.write(self._fd, b"\n")
                raise OSError(f"short write to the spend journal ({written} of {len(line)} bytes)")
        except OSError as exc:  # bookkeeping must never stop paid work (disk full, quota, NFS hiccup)
            for name, value in counters.items():
                self.unrecorded[name] = self.unrecorded.get(name, 0) + value
            if not self._warned:
                logger.warning("could not record spend in %s (%s): if this attempt is killed, `status` will not "
                               "show what it paid from now on", self.path, exc)
                self._warned = True

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                logger.debug("closing the spend journal %s failed", self._fd_path)
            self._fd = None


@dataclass
class ShardScope:
    """What the code running one shard counts into and listens to: its meter, and the event that tells it to
    stop (another shard failed, Ctrl-C): the LLM engine then cancels what it has in flight."""

    meter: UsageMeter
    stop: threading.Event = field(default_factory=threading.Event)


_SCOPE: contextvars.ContextVar[ShardScope | None] = contextvars.ContextVar("taskgalaxy_shard_scope", default=None)


@contextlib.contextmanager
def shard_scope(scope: ShardScope) -> Iterator[ShardScope]:
    """Run a shard's batch function under ``scope``: ``StageContext.add_usage`` counts into its meter. A
    thread the stage starts itself inherits it only through ``contextvars.copy_context()``."""
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


@dataclass
class StageContext:
    """What a stage may use at run time: plain data plus ``load_stage``. Built where the shard work runs
    (``builder.work.StageWork.context``), so it is never pickled along with the runner."""

    run_dir: Path
    stage_dir: Path
    cache_dir: Path
    dry_run: bool
    settings: Any  # the whole validated run config (builder.config.RunConfig)
    load_stage: Callable[[str], "datasets.Dataset"]
    services: dict[str, Any] = field(default_factory=dict)  # e.g. the simulator URL under --dry-run
    # Where usage goes outside any shard scope (a batch function called directly, a tool): the engine gives
    # each shard its own meter (``shard_scope``) and returns its usage with the shard's results.
    meter: UsageMeter = field(default_factory=UsageMeter)

    def current_meter(self) -> UsageMeter:
        scope = _SCOPE.get()
        return scope.meter if scope is not None else self.meter

    def stop_event(self) -> threading.Event | None:
        """Set when the shard running on this thread must stop (None outside a shard scope)."""
        scope = _SCOPE.get()
        return scope.stop if scope is not None else None

    def beat(self) -> None:
        """Tell the engine's stall watchdog this shard is alive (``builder.stage.beat``): call it from long work
        that finishes no row for a while. Rows finished and usage counted beat by themselves."""
        beat()

    def add_usage(self, **counters: float) -> None:
        """Count usage (requests, tokens, cost, cache hits...) for the shard in progress, journalled at once.

        The LLM engine calls it once per billed reply, after the reply is in the request cache: whatever a
        kill interrupts, an answer that is cached is also counted."""
        self.current_meter().add(**counters)

    # The default meter's figures, for code (and tests) that call a batch function outside the engine.
    @property
    def usage(self) -> dict[str, float]:
        return self.meter.usage

    @property
    def unrecorded(self) -> dict[str, float]:
        return self.meter.unrecorded

    @property
    def live_usage_path(self) -> Path | None:
        return self.meter.path

    @live_usage_path.setter
    def live_usage_path(self, path: Path | None) -> None:
        self.meter.path = path

    def close_journal(self) -> None:
        self.meter.close()


class Stage:
    """Subclass per stage. Class attributes describe it; methods build its input and its batch function."""

    name: ClassVar[str]
    description: ClassVar[str] = ""  # what its output holds, in a phrase (the dataset card's table of configs)
    Config: ClassVar[type[StageConfig]]
    key: ClassVar[str]  # the key column of this stage's output rows (e.g. "image_id")
    upstream: ClassVar[str | None] = None  # primary input; None = a source stage (implements source_rows)
    side_inputs: ClassVar[tuple[str, ...]] = ()  # other stages it reads; part of its fingerprint
    batch_size: ClassVar[int | None] = 64  # rows per batch-function call; None = the whole shard at once
    # Failure reasons that mean a server could not answer (an HTTP error after the retries, a timeout): no
    # verdict on the row. A shard holding any is committed (its answers kept, its spend counted) but the stage
    # is not finished: the runner stops with ``UnansweredError`` and the next run computes those shards again,
    # so the rows are asked again once the server is fixed (answers already received come from the cache).
    unanswered_reasons: ClassVar[frozenset[str]] = frozenset()

    def shards_in_flight(self, config: StageConfig) -> int:
        """How many of this stage's shards one process may run at once (default 1: one after the other, on the
        runner's thread). An LLM stage says 2: while one shard's last requests are answered, the next one's
        already fill the endpoint's window, so the paid rate limit never idles at a shard boundary. More than 1
        means its batch function is called from several threads at once and must allow it."""
        return 1

    def resources(self, config: StageConfig) -> dict[str, Any]:
        """What one worker of this stage needs on a cluster (``run.engine: ray``; the local engine ignores it):

        - ``kind``: ``"cpu"`` (each shard a Ray task on any node: cheap to build), ``"gpu"`` or
          ``"llm"`` (a fixed pool of actors, each building the batch function once: a model, a client);
        - ``num_cpus``, ``num_gpus`` per worker (fractions allowed: several CLIP actors may share a GPU);
        - ``workers``: actors in the pool, or tasks at once (None = the engine's choice: one per GPU, per CPU,
          or a few for LLM stages); 1 runs the shards strictly one after another, in input order;
        - ``runtime_env``: a Ray runtime_env for the workers (pip list or conda env), or None;
        - ``driver_node``: run on the driver's node only (a stage that keeps a SQLite file: safe within one host);
        - ``limit_share``: the name of a service key through which each pool member learns its share (1/width)
          of limits the pool divides between its workers (an LLM endpoint's concurrency).

        Default: ``"cpu"`` with ``workers: 1``. One at a time because a CPU stage may carry state from shard to
        shard, as the images stage's dedup ledger does (the first ref of an image wins, so shards must run in
        input order); a stage whose shards are independent overrides this with ``workers: None``."""
        return {"kind": "cpu", "num_cpus": 1, "num_gpus": 0, "workers": 1, "runtime_env": None}

    def features(self, config: StageConfig) -> "datasets.Features":
        """The output rows' schema (without the runner's in-band columns)."""
        raise NotImplementedError

    def source_rows(self, config: StageConfig, ctx: StageContext) -> "datasets.Dataset":
        """Source stages only: the input rows, listed from the config (seed lines, image references...)."""
        raise NotImplementedError(f"stage {self.name!r} has no upstream and must implement source_rows")

    def input_key(self, config: StageConfig) -> str:
        """The key column of the input rows: the upstream stage's key, or the source rows' key."""
        raise NotImplementedError

    def make_batch_fn(self, config: StageConfig, ctx: StageContext) -> BatchFn:
        """The function that turns a batch of input rows into ``BatchOutput.to_columns()``.

        It may carry a ``prefetch(rows)`` attribute: the local engine then calls it with the *next* shard's
        input rows as each shard starts (a hint; e.g. the match stage decodes the next shard's first images
        meanwhile, so the GPU does not idle at the boundary)."""
        raise NotImplementedError

    def make_settle_fn(self, config: StageConfig, ctx: StageContext) -> SettleFn | None:
        """The part of a stage that carries state from row to row, kept out of its batch function: the runner
        applies ``fn(raw shard table) -> (table, usage)`` in its own process to each shard's raw output (rows
        and in-band failures), shard by shard in input order, just before committing it. With one, the batch
        function holds no state across shards, so the shards may run at once (``shards_in_flight``, Ray
        workers on any node) and the output is still that of running them one after another: a shard that
        finishes early waits, as a file, for the ones before it. The images stage's duplicate ledger is the
        case (the first ref of an image in input order wins). None (the default): no such step."""
        return None

    def fingerprint_config(self, config: StageConfig) -> dict[str, Any]:
        """The part of the config that decides the output (default: all of it). Stages drop pure speed knobs
        (batch sizes, worker counts) here, so tuning them never re-runs a finished stage."""
        return config.model_dump(mode="json")

    def fingerprint_parts(self, config: StageConfig) -> dict[str, Any]:
        """What else decides the output besides the config: prompt versions, code versions, model ids."""
        return {}

    def settings_parts(self, config: StageConfig, settings: Any) -> dict[str, Any]:
        """What this stage uses from the run's shared sections (e.g. its LLM endpoint's model and sampling):
        part of its fingerprint, so changing the model re-runs the stages that call it."""
        return {}

    def llm_endpoints(self, config: StageConfig) -> list[str]:
        """The ``llm.endpoints`` this stage calls, so their credentials are checked before anything runs."""
        return []

    def estimate(self, config: StageConfig, run_config: Any, assumptions: Any) -> list[tuple[str, Any]]:
        """What this stage will request and cost, before anything runs (``taskgalaxy estimate``): rows of
        (label, ``processors.llm.estimate.Projection``). A stage that calls no LLM has none."""
        return []

    def close(self, config: StageConfig) -> None:
        """Free what ``make_batch_fn`` set up that outlives it (models on a GPU, worker processes). The runner
        calls it when the stage ends, finished or not, before the next stage starts."""

    def finalize(self, config: StageConfig, ctx: StageContext, output: "datasets.Dataset") -> None:
        """Runs once all shards are done (e.g. write tasktype.txt). Must be idempotent."""
