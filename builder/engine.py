"""The local engine: a stage's pending shards run in this process (``builder.work`` describes the work).

An engine only turns (stage work, pending shards) into shard outcomes - raw Arrow rows plus in-band failures
and the usage each shard paid - yielded as each shard finishes; the runner decides file names, resume and
accounting, and commits each outcome as it arrives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa

from builder.work import ShardOutcome, ShardTask, StageWork, execute_shard

STOP_WAIT_S = 20.0  # after a stop, how long shards still in flight may take to unwind (> the LLM accounts' UNWIND_S)

logger = logging.getLogger(__name__)


def read_arrow_table(path: Path) -> pa.Table:
    """Read a `datasets` Arrow file (IPC stream) memory-mapped."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def write_arrow_table(path: Path, table: pa.Table, features: datasets.Features | None = None) -> None:
    """Write ``table`` as a `datasets` Arrow file that ``Dataset.from_file`` reads with its features."""
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(path=str(path), features=features)
    try:
        writer.write_table(table)
        writer.finalize()
    finally:
        writer.close()


class LocalEngine:
    """This process: ``Dataset.map`` over each shard, batch by batch. A stage that allows more than one shard
    in flight (``Stage.shards_in_flight``: the LLM stages) gets that many shards on worker threads, sharing
    one batch function, so the endpoint's window stays full from one shard into the next; the others run one
    after the other on the caller's thread, as they always did."""

    name = "local"

    def run_shards(self, work: StageWork, tasks: Iterable[ShardTask], *, features: datasets.Features,
                   batch_size: int | None, in_flight: int = 1,
                   on_rows: Callable[[int], None] | None = None) -> Iterator[ShardOutcome]:
        tasks = list(tasks)
        if not tasks:
            return
        fn = work.build()  # once per stage and process: a finished stage loads no model
        if in_flight <= 1 or len(tasks) == 1:
            hint = getattr(fn, "prefetch", None)  # a GPU stage: decode the next shard's head meanwhile
            for index, task in enumerate(tasks):
                if hint is not None and index + 1 < len(tasks):
                    _prefetch(hint, tasks[index + 1])
                yield execute_shard(fn, task, features=features, batch_size=batch_size, on_rows=on_rows)
            return
        yield from self._concurrently(fn, tasks, features, batch_size, in_flight, on_rows, work.stage.name)

    @staticmethod
    def _concurrently(fn, tasks, features, batch_size, in_flight, on_rows, name) -> Iterator[ShardOutcome]:
        stop = threading.Event()  # tells the shards still running to stop (their LLM calls cancel)
        pool = concurrent.futures.ThreadPoolExecutor(in_flight, thread_name_prefix=f"{name}-shard")
        queue = iter(tasks)
        running: set[concurrent.futures.Future] = set()

        def submit_next() -> None:
            task = next(queue, None)
            if task is not None and not stop.is_set():
                running.add(pool.submit(execute_shard, fn, task, features=features, batch_size=batch_size,
                                        on_rows=on_rows, stop=stop))

        failed: ShardOutcome | None = None
        deadline = None
        try:
            for _ in range(in_flight):
                submit_next()
            while running:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = concurrent.futures.wait(running, timeout=timeout,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                if not done:  # the shards still running did not unwind in time: stop waiting for them
                    break
                for future in done:
                    running.discard(future)
                    try:
                        outcome = future.result()
                    except BaseException:  # noqa: BLE001 - stopped by ``stop``: not finished, its spend is journalled
                        continue
                    if outcome.error is None:
                        if failed is None:
                            submit_next()
                        yield outcome  # finished, even after another shard failed: the runner commits it
                    elif failed is None:
                        failed, deadline = outcome, time.monotonic() + STOP_WAIT_S
                        stop.set()  # nothing new is sent or started; what is on the wire may come back
            if failed is not None:
                yield failed  # the runner stops on it, with every shard that did finish committed
        finally:
            stop.set()
            # The shards still running unwind (answers cached, spend journalled) - not for ever.
            left = STOP_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
            concurrent.futures.wait(running, timeout=left)
            pool.shutdown(wait=False, cancel_futures=True)


def _prefetch(hint: Callable, task: ShardTask) -> None:
    """Tell the batch function which shard comes next (``fn.prefetch(rows)``: the match stage decodes its first
    images while the current shard computes, so the GPU does not idle at the boundary). Only a hint: a
    failure here is the next shard's to report, when it runs."""
    try:
        hint(task.rows)
    except Exception:  # noqa: BLE001
        logger.debug("prefetching shard %d failed", task.index, exc_info=True)
