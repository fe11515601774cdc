"""The Ray engine (``run.engine: ray``): a stage's pending shards run on Ray workers; the runner commits them.

Each pending shard becomes one Ray call that runs ``execute_shard`` where the worker is and returns the
``ShardOutcome`` (rows by the path of the raw Arrow file it wrote under ``task.tmp_path``, usage by value).
The runner, on the driver, names, checks and commits every shard exactly as with the local engine; a worker
never writes a final name, so a retried call (a worker died, Ray ran it again) cannot leave a second copy.

What a stage runs on comes from ``Stage.resources`` (overridable per stage with ``run.ray_resources``):

- ``cpu`` (e.g. ``images``): each shard a Ray *task* on any node (``workers`` at once: 1 by default, so
  shards that carry state forward run in input order), retried by Ray when its worker dies; the batch
  function is built once per worker process and reused by later tasks;
- ``gpu`` (``match``, local referees) and ``llm`` (stages calling an endpoint): a fixed pool of *actors*,
  each building the batch function once (model on its GPU, clients and their account), restarted by Ray
  when their process dies, which re-runs the shards they held.

Ray core, not Ray Data: the runner needs each shard's outcome (rows, failures *and* usage, or its error) as
that shard finishes, and closing the iterator must stop the rest; Ray Data's unit is a block of rows and its
results a stream of rows, so each shard would travel as one opaque row anyway (see docs/design-notes.md).

The run folder (and the image roots) must lie on a filesystem every node mounts: workers read the shard's
input by the Arrow file it is memory-mapped from and write their output beside it. A worker that cannot
read them fails the shard with a ``WorkerStorageError`` naming the path and the node (docs/scaling.md).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets

from builder.work import ShardOutcome, ShardTask, StageWork, execute_shard

logger = logging.getLogger(__name__)

NAMESPACE = "taskgalaxy"
MAX_RETRIES = 3  # times Ray re-runs a shard whose worker died (a restarted actor, a new task)
LLM_WORKERS = 4  # default pool of an LLM stage (run.ray_resources.<stage>.workers sets another)
STOP_WAIT_S = 10.0  # after a stop, how long the workers still running may take to go
WORKER_CHECKS = "ray_worker_checks"  # services key: callables(StageWork) a worker runs before its first shard
RESOURCE_KEYS = ("kind", "num_cpus", "num_gpus", "workers", "runtime_env", "gpu_optional")


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


# -- what runs on a worker ----------------------------------------------------------------------------
class _WorkerState:
    """One stage's work in one worker process: checked and built once, then every shard it is given."""

    def __init__(self, work: StageWork):
        self.work = work
        self._fn = None
        self._lock = threading.Lock()

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
        return _dumps(execute_shard(fn, task, features=features, batch_size=batch_size))


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


def _run_task(holder: list, payload: bytes) -> bytes:
    return _task_state(holder).run(payload)


class ShardActor:
    """A pool member of a ``gpu`` or ``llm`` stage: its batch function is built once, in its constructor's
    process, and serves every shard sent to it (``in_flight`` at once for the LLM stages)."""

    def __init__(self, holder: list):
        import ray

        self.state = _WorkerState(ray.get(holder[0]))

    def run(self, payload: bytes) -> bytes:
        return self.state.run(payload)

    def pid(self) -> int:
        return os.getpid()


# -- the driver ---------------------------------------------------------------------------------------
class RayEngine:
    """Runs pending shards on a Ray cluster: ``address`` None starts a local Ray (or uses the one this process
    already joined); ``overrides`` are ``run.ray_resources``: stage name -> keys of ``Stage.resources``."""

    name = "ray"

    def __init__(self, address: str | None = None, overrides: dict[str, dict[str, Any]] | None = None):
        self.address = address
        self.overrides = {name: dict(value) for name, value in (overrides or {}).items()}
        self.actors: list = []  # the current stage's pool
        self.worker_pids: list[int] = []  # their processes, as first started

    def connect(self) -> None:
        """Join the cluster (once per process)."""
        import ray

        if not ray.is_initialized():
            logger.info("ray: %s", f"joining {self.address}" if self.address else "starting a local Ray")
            ray.init(address=self.address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)

    def resources(self, work: StageWork) -> dict[str, Any]:
        need = dict(work.stage.resources(work.config))
        need.update(self.overrides.get(work.stage.name, {}))
        unknown = set(need) - set(RESOURCE_KEYS)
        if unknown:
            raise ValueError(f"stage {work.stage.name!r}: unknown resource keys {sorted(unknown)} "
                             f"(known: {', '.join(RESOURCE_KEYS)})")
        if need.get("kind") not in ("cpu", "gpu", "llm"):
            raise ValueError(f"stage {work.stage.name!r}: resources kind must be cpu, gpu or llm, "
                             f"got {need.get('kind')!r}")
        return need

    def run_shards(self, work: StageWork, tasks: Iterable[ShardTask], *, features: datasets.Features,
                   batch_size: int | None, in_flight: int = 1,
                   on_rows: Callable[[int], None] | None = None) -> Iterator[ShardOutcome]:
        import ray

        tasks = list(tasks)
        if not tasks:
            return
        self.connect()
        need = self.resources(work)
        holder = [ray.put(work)]  # once per stage; every worker fetches it from the object store
        payloads = collections.deque((t, _payload(t, features, batch_size)) for t in tasks)
        if need["kind"] == "cpu":
            submit, slots = self._tasks(holder, need, len(tasks))
        else:
            submit, slots = self._pool(holder, need, len(tasks), max(1, in_flight))
        yield from self._schedule(submit, slots, payloads, on_rows, work.stage.name)

    # Each slot is one shard in flight: a task slot, or one of an actor's ``in_flight`` places.
    def _tasks(self, holder: list, need: dict, count: int):
        import ray

        remote = ray.remote(_run_task).options(num_cpus=need.get("num_cpus") or 1, max_retries=MAX_RETRIES,
                                               runtime_env=need.get("runtime_env") or None)
        cpus = ray.cluster_resources().get("CPU", 1)
        width = need.get("workers") or max(1, int(cpus // (need.get("num_cpus") or 1)))
        self.actors = []
        return (lambda slot, payload: remote.remote(holder, payload)), [None] * min(count, width)

    def _pool(self, holder: list, need: dict, count: int, in_flight: int):
        import ray

        num_gpus = float(need.get("num_gpus") or 0)
        gpus = ray.cluster_resources().get("GPU", 0)
        if num_gpus and not gpus and need.get("gpu_optional"):
            logger.info("ray: the cluster has no GPU; the %s workers run on the CPU", need["kind"])
            num_gpus = 0.0
        num_cpus = need.get("num_cpus")
        num_cpus = 1 if num_cpus is None else num_cpus
        if need["kind"] == "llm" and _driver_node_cpus() < num_cpus:
            # A head started with --num-cpus=0 (common): the LLM workers, which wait on the network, take no
            # CPU rather than wait for ever for one that the node will never offer.
            logger.warning("ray: the driver's node offers Ray no CPU; the LLM workers run there with num_cpus=0")
            num_cpus = 0
        if need.get("workers"):
            width = int(need["workers"])
        elif num_gpus:
            width = max(1, int(gpus // num_gpus))
        elif need["kind"] == "llm":
            # One process already sends 1,400+ requests/s (docs/benchmarks.md), more than any account allows:
            # a few workers are for resilience and CPU-bound request building, not for rate.
            room = int(_driver_node_cpus() // num_cpus) if num_cpus else LLM_WORKERS
            width = max(1, min(LLM_WORKERS, room))
        else:
            width = 1  # a "gpu" stage on a cluster without GPUs: one model on the CPU
        width = min(width, count)
        placement = {}
        if need["kind"] == "llm":
            # LLM workers share the run's request cache, one SQLite file in WAL mode: safe among the processes
            # of one host only (its lock index is shared memory), so they stay on the driver's node. They wait
            # on the network; one node holds the few a rate limit needs (docs/scaling.md).
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(ShardActor).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=MAX_RETRIES,
            max_concurrency=in_flight, runtime_env=need.get("runtime_env") or None, **placement)
        self.actors = [actor.remote(holder) for _ in range(width)]
        # Started before any shard is sent (an environment that cannot be built fails here, once); the pids
        # name the workers in the log (and let the tests kill one).
        try:
            self.worker_pids = ray.get([a.pid.remote() for a in self.actors])
        except BaseException:
            self._stop([])
            raise
        logger.info("ray: %d %s worker(s) (pids %s), %g GPU and %g CPU each, %d shard(s) each at once", width,
                    need["kind"], ",".join(map(str, self.worker_pids)), num_gpus, num_cpus, in_flight)
        slots = [a for a in self.actors for _ in range(in_flight)]
        return (lambda slot, payload: slot.run.remote(payload)), slots

    def _schedule(self, submit, slots, payloads, on_rows, name) -> Iterator[ShardOutcome]:
        import cloudpickle
        import ray

        running: dict[Any, tuple[Any, ShardTask]] = {}
        stopping = False

        def start(slot) -> None:
            if payloads and not stopping:
                task, payload = payloads.popleft()
                running[submit(slot, payload)] = (slot, task)

        try:
            for slot in slots:
                start(slot)
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    slot, task = running.pop(ref)
                    try:
                        outcome = cloudpickle.loads(ray.get(ref))
                    except ray.exceptions.RayError as exc:  # out of retries, or the cluster is gone
                        outcome = ShardOutcome(index=task.index, usage={}, unrecorded={}, seconds=0.0, error=exc)
                    if outcome.error is None:
                        if on_rows is not None:
                            on_rows(len(task.rows))
                        start(slot)
                    else:
                        stopping = True  # no new shard starts; the runner stops on this one
                    yield outcome
        finally:
            self._stop(list(running))

    def _stop(self, running: list) -> None:
        """End the stage's workers (a pool holds a model, a GPU, connections); shards still running stop with
        them. Their spend journals stay on disk, where the runner adopts them."""
        import ray

        for ref in running:
            try:
                ray.cancel(ref, force=not self.actors)  # tasks are force-cancelled; actors go below
            except Exception:  # noqa: BLE001 - best effort: the kill below ends them anyway
                logger.debug("cancelling a shard failed", exc_info=True)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if running:
            ray.wait(running, num_returns=len(running), timeout=STOP_WAIT_S)
        self.actors = []


def _driver_node_cpus() -> float:
    """The CPUs of the node this driver runs on (where the LLM workers go)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here and n.get("Alive")), None)
    return float((node or {}).get("Resources", {}).get("CPU", 1))


def _payload(task: ShardTask, features: datasets.Features, batch_size: int | None) -> bytes:
    """The shard as bytes: its index travels apart, so a worker that cannot open the rows still says which."""
    import cloudpickle

    return cloudpickle.dumps((task.index, cloudpickle.dumps((task, features, batch_size))))
