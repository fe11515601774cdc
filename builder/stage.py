"""A stage: a name, a typed config and a batch function over rows.

The runner (``builder.runner``) knows nothing about what a stage does; a stage knows nothing about shards,
resume or the run folder. A stage reads its *primary* input (the upstream stage's output, or rows it lists
itself from its config when it is a source stage) and may read any other finished stage as a side input
through ``StageContext.load_stage``; every stage it reads is declared in ``reads`` so that its fingerprint
changes whenever one of them changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import datasets

BatchFn = Callable[[dict[str, list]], dict[str, list]]


logger = logging.getLogger(__name__)

class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Left out of dumps when unset, so config.yaml and the dataset card show it only where it was given.
    shard_size: int | None = Field(
        None, ge=1, exclude_if=lambda value: value is None,
        description="input rows per shard for this stage (default run.shard_size): larger for fast GPU stages, "
        "whose per-shard start-up then matters less; smaller for paid stages, so less is at risk")


@dataclass
class StageContext:
    """What a stage may use at run time. Built by the runner; never pickled into Ray workers whole."""

    run_dir: Path
    stage_dir: Path
    cache_dir: Path
    dry_run: bool
    settings: Any  # the whole validated run config (builder.config.RunConfig)
    load_stage: Callable[[str], "datasets.Dataset"]
    usage: dict[str, float] = field(default_factory=dict)  # tokens, requests, cost...: summed into state.json
    services: dict[str, Any] = field(default_factory=dict)  # e.g. the simulator URL under --dry-run
    # Where the runner keeps the running usage of the shard in progress, so that money spent by an attempt
    # that is killed (SIGKILL, OOM, power) still shows in the totals after the resume. None: not kept.
    live_usage_path: Path | None = None
    live_usage_interval_s: float = 1.0
    _live_written: float | None = field(default=None, repr=False)
    _live_warned: bool = field(default=False, repr=False)

    def add_usage(self, **counters: float) -> None:
        for name, value in counters.items():
            self.usage[name] = self.usage.get(name, 0) + value
        self.note_live_usage()

    def note_live_usage(self, in_flight: dict[str, float] | None = None, *, force: bool = False) -> None:
        """Record the shard's usage so far, plus ``in_flight`` (counters of a call still running), on disk.

        At most once per ``live_usage_interval_s`` (the first time at once): cheap enough to call after every
        reply. The file is replaced atomically, so a kill leaves the last whole record.
        """
        if self.live_usage_path is None:
            return
        now = time.monotonic()
        if not force and self._live_written is not None and now - self._live_written < self.live_usage_interval_s:
            return
        record = dict(self.usage)
        for name, value in (in_flight or {}).items():
            record[name] = record.get(name, 0) + value
        if record:
            from builder.runfolder import atomic_write_json

            try:
                atomic_write_json(self.live_usage_path, record)
            except OSError as exc:  # bookkeeping must never stop paid work (disk full, quota, NFS hiccup)
                if not self._live_warned:
                    logger.warning("could not record the running usage in %s (%s); a hard kill now would "
                                   "under-count this shard's cost", self.live_usage_path, exc)
                self._live_warned = True
                return
            self._live_written, self._live_warned = now, False


class Stage:
    """Subclass per stage. Class attributes describe it; methods build its input and its batch function."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    key: ClassVar[str]  # the key column of this stage's output rows (e.g. "image_id")
    upstream: ClassVar[str | None] = None  # primary input; None = a source stage (implements source_rows)
    side_inputs: ClassVar[tuple[str, ...]] = ()  # other stages it reads; part of its fingerprint
    batch_size: ClassVar[int | None] = 64  # rows per batch-function call; None = the whole shard at once

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
        """The function that turns a batch of input rows into ``BatchOutput.to_columns()``."""
        raise NotImplementedError

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

    def close(self, config: StageConfig) -> None:
        """Free what ``make_batch_fn`` set up that outlives it (models on a GPU, worker processes). The runner
        calls it when the stage ends, finished or not, before the next stage starts."""

    def finalize(self, config: StageConfig, ctx: StageContext, output: "datasets.Dataset") -> None:
        """Runs once all shards are done (e.g. write tasktype.txt). Must be idempotent."""
