"""A stage: a name, a typed config and a batch function over rows.

The runner (``builder.runner``) knows nothing about what a stage does; a stage knows nothing about shards,
resume or the run folder. A stage reads its *primary* input (the upstream stage's output, or rows it lists
itself from its config when it is a source stage) and may read any other finished stage as a side input
through ``StageContext.load_stage``; every stage it reads is declared in ``reads`` so that its fingerprint
changes whenever one of them changes.
"""

from __future__ import annotations

import logging
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
    # The spend journal of the shard in progress (``stats/live-NNNNN.jsonl``): one line per ``add_usage``,
    # appended before the call returns, so money spent by an attempt that is killed (SIGKILL, OOM, power)
    # still shows after the resume, to the last reply. None: not kept.
    live_usage_path: Path | None = None
    unrecorded: dict[str, float] = field(default_factory=dict)  # usage the journal could not take (disk full)
    _journal: Any = field(default=None, repr=False)
    _journal_warned: bool = field(default=False, repr=False)

    def add_usage(self, **counters: float) -> None:
        """Count usage (requests, tokens, cost, cache hits...) for this shard and journal it on disk at once.

        The LLM engine calls it once per billed reply, after the reply is in the request cache: whatever a
        kill interrupts, an answer that is cached is also counted."""
        for name, value in counters.items():
            self.usage[name] = self.usage.get(name, 0) + value
        if self.live_usage_path is not None and counters:
            self._journal_line(counters)

    def _journal_line(self, counters: dict[str, float]) -> None:
        import json
        import os

        line = (json.dumps(counters, separators=(",", ":")) + "\n").encode()
        try:
            if self._journal is None or self._journal[0] != self.live_usage_path:
                self.close_journal()
                self.live_usage_path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.live_usage_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._journal = (self.live_usage_path, fd)
            # One write of a short line to an O_APPEND file: in the kernel once it returns, so a killed
            # process loses nothing; a torn last line (power loss) is skipped by the reader.
            written = os.write(self._journal[1], line)
            if written != len(line):  # a nearly full disk: end the fragment so the next line stands alone
                os.write(self._journal[1], b"\n")
                raise OSError(f"short write to the spend journal ({written} of {len(line)} bytes)")
        except OSError as exc:  # bookkeeping must never stop paid work (disk full, quota, NFS hiccup)
            for name, value in counters.items():
                self.unrecorded[name] = self.unrecorded.get(name, 0) + value
            if not self._journal_warned:
                logger.warning("could not record spend in %s (%s): if this attempt is killed, `status` will not "
                               "show what it paid from now on", self.live_usage_path, exc)
                self._journal_warned = True

    def close_journal(self) -> None:
        if self._journal is not None:
            import os

            try:
                os.close(self._journal[1])
            except OSError:
                logger.debug("closing the spend journal %s failed", self._journal[0])
            self._journal = None


class Stage:
    """Subclass per stage. Class attributes describe it; methods build its input and its batch function."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    key: ClassVar[str]  # the key column of this stage's output rows (e.g. "image_id")
    upstream: ClassVar[str | None] = None  # primary input; None = a source stage (implements source_rows)
    side_inputs: ClassVar[tuple[str, ...]] = ()  # other stages it reads; part of its fingerprint
    # An LLM stage's answers under --dry-run: "module:attribute" of the simulator Responder for its prompt.
    sim_responder: ClassVar[str | None] = None
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

    def estimate(self, config: StageConfig, run_config: Any, assumptions: Any) -> list[tuple[str, Any]]:
        """What this stage will request and cost, before anything runs (``taskgalaxy estimate``): rows of
        (label, ``processors.llm.estimate.Projection``). A stage that calls no LLM has none."""
        return []

    def close(self, config: StageConfig) -> None:
        """Free what ``make_batch_fn`` set up that outlives it (models on a GPU, worker processes). The runner
        calls it when the stage ends, finished or not, before the next stage starts."""

    def finalize(self, config: StageConfig, ctx: StageContext, output: "datasets.Dataset") -> None:
        """Runs once all shards are done (e.g. write tasktype.txt). Must be idempotent."""
