"""What runs on a Ray worker (``run.engine: ray``; the driver side is ``builder.ray_engine``).

A worker gets the stage's ``StageWork`` once (from the object store) and shards as pickled payloads; it checks
that it can read what every node must see, builds the batch function once, runs each shard with
``execute_shard`` and sends the ``ShardOutcome`` back pickled. CPU stages run as tasks (``run_task``, the built
work kept per worker process), GPU and LLM stages as ``ShardActor`` pool members.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from builder.work import ShardOutcome, ShardTask, StageWork, execute_shard

logger = logging.getLogger(__name__)

WORKER_CHECKS = "ray_worker_checks"  # services key: callables(StageWork) a worker runs before its first shard


class WorkerStorageError(OSError):
    """A worker cannot read what every node must see (the run folder, a shard's input, an image root)."""


def node_name() -> str:
    """This worker's node, as an operator finds it: host name, IP and Ray node id."""
    try:
        import ray

        context = ray.get_runtime_context()
        node_id = context.get_node_id()[:12]
        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - a name for a message; never the reason a shard fails
        node_id, ip = "?", "?"
    return f"{socket.gethostname()} ({ip}, Ray node {node_id})"


def storage_error(path: Path | str, exc: BaseException | str) -> WorkerStorageError:
    detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else exc
    return WorkerStorageError(
        f"node {node_name()} cannot read {path} ({detail}): the run folder and the image roots must lie on a "
        "filesystem every node of the Ray cluster mounts at the same path (NFS, Lustre, EFS; docs/scaling.md)")


def check_readable(path: Path) -> None:
    """Raise ``WorkerStorageError`` (naming the path and this node) unless ``path`` can be listed or read."""
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as handle:
                handle.read(1)
    except OSError as exc:
        raise storage_error(path, exc) from None


class _WorkerState:
    """One stage's work in one worker process: checked and built once, then every shard it is given."""

    def __init__(self, work: StageWork):
        self.work = work
        self._fn = None
        self._lock = threading.Lock()
        self.stop = threading.Event()  # set by the driver on a stop: LLM calls send nothing more and unwind

    def batch_fn(self):
        with self._lock:
            if self._fn is None:
                check_readable(self.work.run_dir)
                for check in self.work.services.get(WORKER_CHECKS, ()):
                    check(self.work)  # e.g. the image roots are mounted here (processors.ray_worker)
                self._fn = self.work.build()
            return self._fn

    def run(self, payload: bytes) -> bytes:
        started = time.monotonic()
        index = -1
        try:
            index, task, features, batch_size = _load_task(payload)
            _adopt_previous_attempt(self.work.stage_dir, task)
            fn = self.batch_fn()
        except Exception as exc:  # noqa: BLE001 - the shard's error, returned like any other (the runner names it)
            return _dumps(ShardOutcome(index=index, usage={}, unrecorded={}, seconds=time.monotonic() - started,
                                       error=exc))
        outcome = execute_shard(fn, task, features=features, batch_size=batch_size, stop=self.stop)
        return _dumps(outcome)


def _load_task(payload: bytes):
    """The pickled (index, task, features, batch size); the task's rows are memory-mapped from the shared run
    folder, so a node that does not mount it fails here, and the error names the file and the node."""
    import cloudpickle

    index, blob = cloudpickle.loads(payload)
    try:
        task, features, batch_size = cloudpickle.loads(blob)
    except (FileNotFoundError, PermissionError) as exc:
        raise storage_error(exc.filename or "the shard's input", exc) from None
    return index, task, features, batch_size


def _adopt_previous_attempt(stage_dir: Path, task: ShardTask) -> None:
    """A journal already at the shard's path was left by an attempt that died on its worker (the runner
    removes stale ones before a stage starts): keep its spend counted, as a resume would."""
    from builder.recovery import interrupted_name

    if task.journal_path.exists():
        target = interrupted_name(stage_dir, task.index, time.time(), "retried")
        task.journal_path.replace(target)
        logger.warning("shard %d: an earlier attempt died on its worker; what it paid is kept in %s", task.index,
                       target.name)


def _dumps(outcome: ShardOutcome) -> bytes:
    """The pickled outcome; an error that does not pickle travels as its text (the runner only reports it)."""
    import cloudpickle

    try:
        return cloudpickle.dumps(outcome)
    except Exception:  # noqa: BLE001
        outcome.error = RuntimeError(f"{type(outcome.error).__name__}: {outcome.error}")
        return cloudpickle.dumps(outcome)


_BUILT: dict[str, _WorkerState] = {}  # a task worker process: stage work (by its object id) -> built state
_BUILT_LOCK = threading.Lock()


def _task_state(holder: list) -> _WorkerState:
    """The built work of a task's stage in this worker process; ``holder`` wraps the ObjectRef so Ray passes
    the ref itself (a stable key) and the work is fetched and built once per process."""
    import ray

    key = holder[0].hex()
    with _BUILT_LOCK:
        state = _BUILT.get(key)
        if state is None:
            _BUILT.clear()  # a new stage: drop the last one's batch function
            state = _BUILT[key] = _WorkerState(ray.get(holder[0]))
        return state


def run_task(holder: list, payload: bytes) -> bytes:
    return _task_state(holder).run(payload)


class ShardActor:
    """A pool member of a ``gpu`` or ``llm`` stage: its batch function is built once, in its constructor's
    process, and serves every shard sent to it (``in_flight`` at once for the LLM stages)."""

    def __init__(self, holder: list, services: dict[str, Any] | None = None):
        import dataclasses

        import ray

        work = ray.get(holder[0])
        if services:  # what this pool member adds (its share of the stage's endpoint concurrency)
            work = dataclasses.replace(work, services={**work.services, **services})
        self.state = _WorkerState(work)

    def run(self, payload: bytes) -> bytes:
        return self.state.run(payload)

    def pid(self) -> int:  # also the liveness ping: one place of the actor's concurrency is kept for it
        return os.getpid()

    def stop(self) -> None:
        """The stage stops: shards running here send nothing more; what is on the wire may come back."""
        self.state.stop.set()
