"""The Ray engine (``run.engine: ray``): a stage's pending shards run on Ray workers; the runner commits them.

Each pending shard becomes one Ray call that runs ``execute_shard`` where the worker is and returns the
``ShardOutcome`` (rows by the path of the raw Arrow file it wrote under ``task.tmp_path``, usage by value).
The runner, on the driver, names, checks and commits every shard exactly as with the local engine; a worker
never writes a final name, so a retried call (a worker died, Ray ran it again) cannot leave a second copy.

What a stage runs on comes from ``Stage.resources`` (overridable per stage with ``run.ray_resources``):

- ``cpu`` (e.g. ``images``, ``final``): each shard a Ray *task* on any node (``workers`` at once: 1 by default,
  for a stage whose shards carry state forward; ``None``: one per CPU — the images stage keeps its state in a
  settle step the runner applies in input order), retried by Ray when its worker dies; the batch
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
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import datasets

from builder.ray_tasks import ShardActor, run_task
from builder.work import ShardOutcome, ShardTask, StageWork

logger = logging.getLogger(__name__)

NAMESPACE = "taskgalaxy"
MAX_RETRIES = 3  # times Ray re-runs a shard whose worker died (a restarted actor, a new task)
MAX_RESTARTS = 3  # times a pool's actor is restarted; then its shards fail (the stage stops, a rerun resumes)
START_TIMEOUT_S = 300.0  # how long a pool's workers may take to be placed and started
PROGRESS_CHECK_S = 120.0  # no shard finished for this long: the workers holding shards are pinged
PING_TIMEOUT_S = 120.0  # a worker that does not answer a ping for this long fails its shards
LLM_WORKERS = 4  # default pool of an LLM stage (run.ray_resources.<stage>.workers sets another)
STOP_WAIT_S = 20.0  # after a stop, how long the shards still running may take to unwind (> the LLM UNWIND_S)
RESOURCE_KEYS = ("kind", "num_cpus", "num_gpus", "workers", "runtime_env", "gpu_optional", "driver_node",
                 "limit_share")


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
            ray.init(address=self.address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True,
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
            submit, slots = self._pool(holder, need, len(tasks), max(1, in_flight), work)
        yield from self._schedule(submit, slots, payloads, on_rows, work.stage.name)

    # Each slot is one shard in flight: a task slot, or one of an actor's ``in_flight`` places.
    def _tasks(self, holder: list, need: dict, count: int):
        import ray

        # e.g. images: its dedup ledger is a SQLite file, safe within one host
        placement = _on_driver_node() if need.get("driver_node") else {}
        remote = ray.remote(run_task).options(num_cpus=need.get("num_cpus") or 1, max_retries=MAX_RETRIES,
                                               runtime_env=need.get("runtime_env") or None, **placement)
        cpus = ray.cluster_resources().get("CPU", 1)
        width = need.get("workers") or max(1, int(cpus // (need.get("num_cpus") or 1)))
        self.actors = []
        return (lambda slot, payload: remote.remote(holder, payload)), [None] * min(count, width)

    def _pool(self, holder: list, need: dict, count: int, in_flight: int, work: StageWork):
        import ray

        num_gpus = float(need.get("num_gpus") or 0)
        if num_gpus and not ray.cluster_resources().get("GPU", 0) and need.get("gpu_optional"):
            logger.info("ray: the cluster has no GPU; the %s workers run on the CPU", need["kind"])
            num_gpus = 0.0
        num_cpus = need.get("num_cpus")
        num_cpus = 1 if num_cpus is None else num_cpus
        on_driver = bool(need.get("driver_node"))  # e.g. a stage whose request cache is one SQLite file
        if on_driver and need["kind"] == "llm" and _driver_node_cpus() < num_cpus:
            # A head started with --num-cpus=0 (common): the LLM workers, which wait on the network, take no
            # CPU rather than wait for ever for one that the node will never offer.
            logger.warning("ray: the driver's node offers Ray no CPU; the LLM workers run there with num_cpus=0")
            num_cpus = 0
        fit = _workers_that_fit(num_cpus, num_gpus, driver_only=on_driver)
        if fit == 0:
            where = "the driver's node" if on_driver else "any node"
            raise RuntimeError(
                f"stage {work.stage.name!r}: no worker fits on {where} ({num_gpus:g} GPU and {num_cpus:g} CPU each)"
                + ("; it keeps files that are safe within one host only (e.g. a SQLite request cache: "
                   "resources driver_node), so its workers run on the driver's node: run the driver on a node with those "
                   f"resources, or set run.ray_resources.{work.stage.name}.driver_node: false if the run folder's "
                   "filesystem gives SQLite working locks across hosts" if on_driver else "")
                + f" (run.ray_resources.{work.stage.name} sets what a worker asks for)")
        if need.get("workers"):
            width = int(need["workers"])
        elif num_gpus:
            width = fit
        elif need["kind"] == "llm":
            # One process already sends 1,400+ requests/s (docs/benchmarks.md), more than any account allows:
            # a few workers are for resilience and CPU-bound request building, not for rate.
            width = LLM_WORKERS
        else:
            width = 1  # a "gpu" stage on a cluster without GPUs: one model on the CPU
        width = max(1, min(width, count, fit))
        placement = _on_driver_node() if on_driver else {}
        # One place more than the shards it runs: the driver's pings and stop() get through while it works.
        actor = ray.remote(ShardActor).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RETRIES,
            max_concurrency=in_flight + 1, runtime_env=need.get("runtime_env") or None, **placement)
        # Limits the pool divides (a stage's ``limit_share``: an LLM endpoint's concurrency): each worker learns
        # its share through that service key (the rate itself is leased from the run's budget actor).
        share = {need["limit_share"]: 1.0 / width} if need.get("limit_share") else {}
        self.actors = [actor.remote(holder, share) for _ in range(width)]
        # Started before any shard is sent (an environment that cannot be built fails here, once). Actors that
        # cannot be placed in time are given up, so the pool never waits for ever for resources that are not
        # there.
        pings = {a.pid.remote(): a for a in self.actors}
        ready, late = ray.wait(list(pings), num_returns=len(pings), timeout=START_TIMEOUT_S)
        if late:
            for ref in late:
                ray.kill(pings[ref], no_restart=True)
            self.actors = [pings[ref] for ref in ready]
            logger.warning("ray: %d of %d %s workers of stage %s could not start within %.0f s (resources taken?); "
                           "going on with %d", len(late), width, need["kind"], work.stage.name, START_TIMEOUT_S,
                           len(ready))
            if not ready:
                raise RuntimeError(f"stage {work.stage.name!r}: no Ray worker started within {START_TIMEOUT_S:.0f} s "
                                   f"({num_gpus:g} GPU and {num_cpus:g} CPU each); is the cluster busy?")
        try:
            self.worker_pids = ray.get(ready)
        except BaseException:
            self._stop([])
            raise
        logger.info("ray: %d %s worker(s) (pids %s), %g GPU and %g CPU each, %d shard(s) each at once%s",
                    len(self.actors), need["kind"], ",".join(map(str, self.worker_pids)), num_gpus, num_cpus,
                    in_flight, " on the driver's node" if on_driver else "")
        slots = [a for a in self.actors for _ in range(in_flight)]
        return (lambda slot, payload: slot.run.remote(payload)), slots

    def _schedule(self, submit, slots, payloads, on_rows, name) -> Iterator[ShardOutcome]:
        import cloudpickle
        import ray

        running: dict[Any, tuple[Any, ShardTask]] = {}
        failed: ShardOutcome | None = None
        deadline = None
        quiet_since = time.monotonic()

        def start(slot) -> None:
            if payloads and failed is None:
                task, payload = payloads.popleft()
                running[submit(slot, payload)] = (slot, task)

        try:
            for slot in slots:
                start(slot)
            while running:
                timeout = PROGRESS_CHECK_S if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = ray.wait(list(running), num_returns=1, timeout=timeout)
                if not done:
                    if deadline is not None:
                        break  # the shards still running did not stop in time: _stop ends them
                    if time.monotonic() - quiet_since > PROGRESS_CHECK_S:
                        self._check_alive(running)
                    continue
                quiet_since = time.monotonic()
                for ref in done:
                    slot, task = running.pop(ref)
                    try:
                        outcome = cloudpickle.loads(ray.get(ref))
                    except ray.exceptions.RayError as exc:  # out of retries, or the cluster is gone
                        outcome = ShardOutcome(index=task.index, usage={}, unrecorded={}, seconds=0.0, error=exc)
                    outcome.index = task.index  # a worker that could not open the shard's input did not know it
                    if outcome.error is None:
                        if on_rows is not None:
                            on_rows(len(task.rows))
                        start(slot)
                        yield outcome  # finished, even after another shard failed: the runner commits it
                    elif failed is None:
                        failed, deadline = outcome, time.monotonic() + STOP_WAIT_S
                        self._signal_stop()  # nothing new is sent; what is on the wire may come back
            if failed is not None:
                yield failed  # the runner stops on it, with every shard that did finish committed
        finally:
            self._stop(list(running))

    def _check_alive(self, running: dict) -> None:
        """No shard finished for a while: ping the workers holding shards (a free place of each actor answers
        at once). One that does not answer - restarting, or pending because no node can host it any more (a
        lost node) - fails its shards instead of leaving the stage waiting for ever."""
        import ray

        actors = {id(slot): slot for slot, _ in running.values() if slot is not None}
        pings = {actor.pid.remote(): key for key, actor in actors.items()}
        ready, late = ray.wait(list(pings), num_returns=len(pings), timeout=PING_TIMEOUT_S)
        dead = {pings[ref] for ref in late}
        if dead:
            names = sorted(task.index for slot, task in running.values() if id(slot) in dead)
            raise RuntimeError(f"Ray workers holding shards {names} did not answer for {PING_TIMEOUT_S:.0f} s "
                               "(restarting, or waiting for a node that can host them): the stage stops; rerun to "
                               "resume once the cluster has the resources again")

    def _signal_stop(self) -> None:
        import ray

        for actor in self.actors:
            try:
                actor.stop.remote()
            except Exception:  # noqa: BLE001 - a dead actor needs no telling
                logger.debug("telling a worker to stop failed", exc_info=True)

    def _stop(self, running: list) -> None:
        """End the stage's workers (a pool holds a model, a GPU, connections). Shards still running are told to
        stop first and given ``STOP_WAIT_S`` to unwind (requests on the wire come back, spend journalled);
        then they end with their workers. Their spend journals stay on disk, where the runner keeps them."""
        import ray

        if running and self.actors:
            self._signal_stop()
            ray.wait(running, num_returns=len(running), timeout=STOP_WAIT_S)
        for ref in running:
            try:
                ray.cancel(ref, force=not self.actors)  # tasks are force-cancelled; actors go below
            except Exception:  # noqa: BLE001 - best effort: the kill below ends them anyway
                logger.debug("cancelling a shard failed", exc_info=True)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if running and not self.actors:
            ray.wait(running, num_returns=len(running), timeout=STOP_WAIT_S)
        self.actors = []


def _workers_that_fit(num_cpus: float, num_gpus: float, *, driver_only: bool) -> int:
    """How many workers asking for ``num_cpus`` and ``num_gpus`` each fit on the alive nodes (each worker on one
    node: a pool sized from the cluster's totals waited for ever for the ones that did not fit)."""
    import math

    import ray

    here = ray.get_runtime_context().get_node_id() if driver_only else None
    total = 0
    for node in ray.nodes():
        if not node.get("Alive") or (here is not None and node.get("NodeID") != here):
            continue
        have = node.get("Resources", {})
        fits = [math.floor(have.get("CPU", 0) / num_cpus + 1e-9) if num_cpus else math.inf,
                math.floor(have.get("GPU", 0) / num_gpus + 1e-9) if num_gpus else math.inf]
        total += min(fits) if min(fits) != math.inf else LLM_WORKERS
    return int(total)


def _on_driver_node() -> dict[str, Any]:
    """Ray options that keep a task or actor on the driver's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}


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
