"""The local engine: a stage's pending shards run in this process (``builder.work`` describes the work).

An engine only turns (stage work, pending shards) into shard outcomes - raw Arrow rows plus in-band failures
and the usage each shard paid - yielded as each shard finishes; the runner decides file names, resume and
accounting, and commits each outcome as it arrives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets

from builder.stage import Heartbeat, heartbeat_scope
from builder.work import ShardOutcome, ShardTask, StageWork, execute_shard

STOP_WAIT_S = 20.0  # after a stop, how long shards still in flight may take to unwind (> the LLM accounts' UNWIND_S)
POLL_S = 5.0  # how often the caller looks at the running shards' heartbeats (the stall watchdog)

logger = logging.getLogger(__name__)


class ShardStopped(Exception):
    """Raised in a shard when the engine stops (Ctrl-C, the stall watchdog, the runner left), at its next batch
    - or sooner, where a stage checks ``StageContext.stop_event`` itself (the match stage, per model batch).
    Its outcome is discarded: a stopped shard is simply not finished."""


class StageStalledError(RuntimeError):
    """A shard showed no sign of life for ``run.stall_timeout_s`` and its stage was stopped; finished shards are
    kept and a rerun resumes. The command line prints the message and exits with ``exit_code``."""

    exit_code = 124  # as timeout(1) reports a command that ran out of time


@dataclass
class _Shard:
    """A shard running on its thread, and its heartbeat (``builder.stage.Heartbeat``)."""

    task: ShardTask
    heartbeat: Heartbeat

    def describe(self) -> str:
        return f"{self.task.index} ({len(self.task.rows)} rows)"


class StallWatch:
    """The stall watchdog of one stage: looks at its running shards' heartbeats, warns once about each shard
    silent for ``warn_s`` (and says when it moves again), and raises ``StageStalledError`` when one has been
    silent for ``timeout_s``. None or 0 turns either off. A sign of life is a row finished, a model batch done
    (``StageContext.beat``) or usage counted (an LLM reply billed, cache hits)."""

    def __init__(self, stage: str, warn_s: float | None, timeout_s: float | None, clock: Callable[[], float]):
        self.stage, self.warn_s, self.timeout_s, self.clock = stage, warn_s or None, timeout_s or None, clock
        self.warned: set[int] = set()  # shards named in a warning, until they move again
        self.stalled: set[int] = set()  # shards the stop was for

    @classmethod
    def for_work(cls, work: StageWork, clock: Callable[[], float]) -> "StallWatch":
        run = getattr(work.settings, "run", None)
        return cls(work.stage.name, getattr(run, "stall_warn_s", None), getattr(run, "stall_timeout_s", None), clock)

    def check(self, shards: Iterable[_Shard]) -> None:
        if self.warn_s is None and self.timeout_s is None:
            return
        now = self.clock()
        silent = [(shard, now - shard.heartbeat.last) for shard in shards]
        for shard, seconds in silent:
            if shard.task.index in self.warned and self.warn_s is not None and seconds < self.warn_s:
                self.warned.discard(shard.task.index)
                logger.info("stage %s: shard %d moves again", self.stage, shard.task.index)
        if self.timeout_s is not None:
            over = [(shard, seconds) for shard, seconds in silent if seconds >= self.timeout_s]
            if over:
                self.stalled = {shard.task.index for shard, _ in over}
                raise StageStalledError(
                    f"stage {self.stage!r} stopped: {_shards(over)} showed no sign of life for "
                    f"{max(seconds for _, seconds in over):.0f} s (run.stall_timeout_s: {self.timeout_s:g}) - no row "
                    "finished, no model batch, no LLM reply. Finished shards are kept; rerun the same command to "
                    "resume. If it stalls again, `py-spy dump --pid PID` during the stall (the warning at "
                    "run.stall_warn_s names the PID) shows where it waits; run.stall_timeout_s: 0 lets it wait.")
        if self.warn_s is not None:
            new = [(shard, seconds) for shard, seconds in silent
                   if seconds >= self.warn_s and shard.task.index not in self.warned]
            if new:
                self.warned.update(shard.task.index for shard, _ in new)
                stop = (f"the run stops at {self.timeout_s:g} s of silence (run.stall_timeout_s)"
                        if self.timeout_s is not None else "it waits for ever (run.stall_timeout_s is off)")
                logger.warning(
                    "stage %s: %s showed no sign of life for %.0f s (no row finished, no model batch, no LLM "
                    "reply); %s. To see where it waits: py-spy dump --pid %d. Ctrl-C keeps the finished shards "
                    "(rerun to resume); a stage slow but healthy: raise run.stall_warn_s and run.stall_timeout_s.",
                    self.stage, _shards(new), max(seconds for _, seconds in new), stop, os.getpid())

    def forget(self, shard: _Shard) -> None:
        self.warned.discard(shard.task.index)


def _shards(silent: list[tuple[_Shard, float]]) -> str:
    return ("shard " if len(silent) == 1 else "shards ") + ", ".join(shard.describe() for shard, _ in silent)


class LocalEngine:
    """This process: ``Dataset.map`` over each shard, batch by batch, on a thread of its own while the caller's
    thread watches (``StallWatch``: run.stall_warn_s, run.stall_timeout_s). A stage that allows more than one
    shard in flight (``Stage.shards_in_flight``: the LLM stages) gets that many at once, sharing one batch
    function, so the endpoint's window stays full from one shard into the next; the others run one after the
    other, in input order, each started when the caller asks for the next outcome, as they always were.

    The shard threads are daemons: a shard stuck for good (a hung mount, a dead server without a timeout) does
    not keep the process from exiting once the watchdog has stopped the stage. ``clock`` and ``poll_s`` (how
    often the caller looks at the heartbeats) are for tests."""

    name = "local"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, poll_s: float = POLL_S):
        self.clock, self.poll_s = clock, poll_s

    def run_shards(self, work: StageWork, tasks: Iterable[ShardTask], *, features: datasets.Features,
                   batch_size: int | None, in_flight: int = 1,
                   on_rows: Callable[[int], None] | None = None) -> Iterator[ShardOutcome]:
        tasks = list(tasks)
        if not tasks:
            return
        fn = work.build()  # once per stage and process: a finished stage loads no model
        in_flight = 1 if len(tasks) == 1 else max(1, in_flight)
        yield from self._watched(fn, tasks, features, batch_size, in_flight, on_rows, work.stage.name,
                                 StallWatch.for_work(work, self.clock))

    def _watched(self, fn, tasks, features, batch_size, in_flight, on_rows, name,
                 watch: StallWatch) -> Iterator[ShardOutcome]:
        stop = threading.Event()  # tells the shards still running to stop (their LLM calls cancel)
        # Set when the caller leaves (Ctrl-C, the watchdog, the runner stopped): a shard then stops at its next
        # batch too. After another shard's failure alone, a shard in flight still finishes its batches.
        abort = threading.Event()
        hint = getattr(fn, "prefetch", None) if in_flight == 1 else None  # a GPU stage: decode the next one's head
        queue = list(tasks)
        running: dict[concurrent.futures.Future, _Shard] = {}

        def guarded(batch: dict[str, list]) -> dict[str, list]:
            if abort.is_set():
                raise ShardStopped(f"stage {name}: stopped before this batch")
            return fn(batch)

        def run_one(shard: _Shard) -> ShardOutcome:
            def rows(count: int) -> None:
                shard.heartbeat.beat()
                if on_rows is not None:
                    on_rows(count)

            with heartbeat_scope(shard.heartbeat):  # usage meters made in the shard beat it too
                return execute_shard(guarded, shard.task, features=features, batch_size=batch_size, on_rows=rows,
                                     stop=stop)

        def submit_next() -> None:
            if not queue or stop.is_set():
                return
            task = queue.pop(0)
            if hint is not None and queue:
                _prefetch(hint, queue[0])
            shard = _Shard(task, Heartbeat(self.clock))
            running[_on_thread(run_one, shard, name=f"{name}-shard-{task.index}")] = shard

        failed: ShardOutcome | None = None
        deadline = None
        try:
            for _ in range(in_flight):
                submit_next()
            while running:
                timeout = self.poll_s if deadline is None else min(self.poll_s, max(0.0, deadline - time.monotonic()))
                done, _ = concurrent.futures.wait(running, timeout=timeout,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                if not done and deadline is not None and time.monotonic() >= deadline:
                    break  # the shards still running did not unwind in time: stop waiting for them
                for future in done:
                    watch.forget(running.pop(future))
                    try:
                        outcome = future.result()
                    except BaseException:
                        if stop.is_set():  # stopped (its spend is journalled): not finished
                            continue
                        raise  # e.g. KeyboardInterrupt raised in the batch function itself
                    if outcome.error is None:
                        if failed is None and in_flight > 1:
                            submit_next()  # keeps the window full while the runner commits this one
                        yield outcome  # finished, even after another shard failed: the runner commits it
                        if failed is None and in_flight == 1:
                            submit_next()  # one at a time: the next starts once this one is committed
                    elif failed is None:
                        failed, deadline = outcome, time.monotonic() + STOP_WAIT_S
                        stop.set()  # nothing new is sent or started; what is on the wire may come back
                if failed is None:
                    watch.check(running.values())  # warns; raises StageStalledError
            if failed is not None:
                yield failed  # the runner stops on it, with every shard that did finish committed
        finally:
            stop.set()
            abort.set()
            # The shards still running unwind (answers cached, spend journalled) - not for ever, and a stalled
            # one not at all.
            left = STOP_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
            concurrent.futures.wait([f for f, s in running.items() if s.task.index not in watch.stalled],
                                    timeout=left)


def _on_thread(target: Callable, *args: Any, name: str) -> concurrent.futures.Future:
    """``target(*args)`` on a new daemon thread; its result or exception (any, KeyboardInterrupt included) in
    the future."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = target(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which decides
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _prefetch(hint: Callable, task: ShardTask) -> None:
    """Tell the batch function which shard comes next (``fn.prefetch(rows)``: the match stage decodes its first
    images while the current shard computes, so the GPU does not idle at the boundary). Only a hint: a
    failure here is the next shard's to report, when it runs."""
    try:
        hint(task.rows)
    except Exception:  # noqa: BLE001
        logger.debug("prefetching shard %d failed", task.index, exc_info=True)
