#!/usr/bin/env python
"""Benchmark the Ray engine on a simulated multi-node cluster (``ray.cluster_utils.Cluster``, 3 nodes here).

  identical     the demo (configs/demo.yaml, --dry-run) under ``engine: ray`` and under the local engine: the
                same LLaVA export (byte for byte) and the same ``status`` counts per stage -> ray_identical
  budget        the filter stage on 4 Ray workers against the simulator (its own process) enforcing 3,000 RPM
                per sliding second, the endpoint at ``rpm: 3000``: achieved rate / limit, share of 429s
                -> shared_budget_utilisation, shared_budget_rate_429
  kill          the filter stage on 4 workers (simulator at 200 ms), one worker SIGKILLed once the first shard
                is committed; the stage completes -> worker_kill_lost (rows that differ from the reference
                run's), worker_kill_duplicates (requests the simulator answered twice), and the bound: the
                requests the dead worker had in flight at most (its shards' rows)

The last line printed is ``key=value`` pairs. ``--images N`` sets the size of the budget and kill runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_llm import SimProcess  # noqa: E402

logger = logging.getLogger("bench_ray")
NODES = 3
CPUS_PER_NODE = 2
WORKERS = 4

BUDGET_CONFIG = """
run: {{name: bench-ray, shard_size: 40, ray_resources: {{filter: {{workers: {workers}}}}}}}
llm:
  endpoints:
    gpt4o: {{model: gpt-4o-2024-08-06, image_detail: low, image_max_side: 64, rpm: 3000, max_concurrency: 64,
             max_retries: 10}}
stages:
  taxonomy: {{levels: 2, rounds_per_level: 1, children_per_request: 3, new_first_level_per_round: 1, plots: false}}
  images:
    sources: [{{type: synthetic, count: {images}, seed: 3}}]
  match: {{model: tg-tiny-clip, pretrained: null, top_k: 4}}
  score: {{referees: [{{name: tiny_llava, preset: tiny-random-llava}}]}}   # not run here
  final: {{threshold: 1}}
"""


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    from builder.ray_engine import NAMESPACE

    node = {"num_cpus": CPUS_PER_NODE, "object_store_memory": 200 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(**node)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    return cluster


def run(config: Path, run_dir: Path, *, engine: str, only=None, services=None):
    from processors.session import dry_run_services, open_run

    if services is None:
        with dry_run_services(True) as own:
            return run(config, run_dir, engine=engine, only=only, services=own)
    runner = open_run(config, run_dir=run_dir, dry_run=True, services=services, progress=False, engine=engine)
    runner.run(only)
    return runner


def status_counts(run_dir: Path) -> dict:
    from builder.status import stage_summaries

    keep = ("shards_done", "shards_total", "rows_in", "rows_out", "failures_by_reason", "item_failures_by_reason",
            "tokens", "requests", "cost_usd", "fingerprint", "done")
    return {s["stage"]: {k: s.get(k) for k in keep} for s in stage_summaries(run_dir)}


def export(run_dir: Path, out: Path) -> bytes:
    subprocess.run([sys.executable, str(ROOT / "taskgalaxy.py"), "export", str(run_dir), "--llava", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out.read_bytes()


def identical(tmp: Path) -> dict:
    demo = ROOT / "configs" / "demo.yaml"
    started = time.monotonic()
    run(demo, tmp / "demo-local", engine="local")
    local_s = time.monotonic() - started
    started = time.monotonic()
    run(demo, tmp / "demo-ray", engine="ray")
    ray_s = time.monotonic() - started
    same_export = export(tmp / "demo-local", tmp / "x-local" / "llava.json") == \
        export(tmp / "demo-ray", tmp / "x-ray" / "llava.json")
    same_status = status_counts(tmp / "demo-local") == status_counts(tmp / "demo-ray")
    out = {"ray_identical": int(same_export and same_status), "same_export": same_export,
           "same_status": same_status, "demo_local_s": round(local_s, 1), "demo_ray_s": round(ray_s, 1)}
    print(f"identical: {out}", flush=True)
    return out


def prepared(tmp: Path, images: int) -> tuple[Path, Path]:
    """A run folder with taxonomy, images and match done (local engine): what the LLM stage reads."""
    config = tmp / "budget.yaml"
    config.write_text(BUDGET_CONFIG.format(images=images, workers=WORKERS))
    base = tmp / "base"
    run(config, base, engine="local", only={"taxonomy", "images", "match"})
    return config, base


def copy_base(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, ignore=shutil.ignore_patterns("cache", "run.lock"))
    return target


def budget(config: Path, base: Path, tmp: Path) -> dict:
    from processors.pipeline import DRY_RUN_API_KEY

    run_dir = copy_base(base, tmp / "budget")
    with SimProcess("--rpm-limit", "3000", "--latency-ms", "100", "--jitter-ms", "20") as sim:
        services = {"llm_base_url": sim.base_url, "llm_api_key": DRY_RUN_API_KEY}
        started = time.monotonic()
        run(config, run_dir, engine="ray", only={"filter"}, services=services)
        stage_s = time.monotonic() - started
        stats = sim.stats()
    ok = sum(stats["ok_per_key"].values())
    span = stats["last_at"] - stats["first_at"]
    rate = ok / span
    out = {"shared_budget_utilisation": round(rate / 50.0, 3),
           "shared_budget_rate_429": round(stats["outcomes"].get("429_rpm", 0) / stats["received"], 4),
           "budget_requests": ok, "budget_received": stats["received"], "budget_rps": round(rate, 1),
           "budget_accepted_peak_1s": stats["accepted_peak_1s"], "budget_stage_s": round(stage_s, 1)}
    print(f"budget: {out} outcomes={stats['outcomes']}", flush=True)
    return out, run_dir


def kill(config: Path, base: Path, reference: Path, tmp: Path) -> dict:
    from processors.pipeline import DRY_RUN_API_KEY
    from processors.session import open_run

    run_dir = copy_base(base, tmp / "kill")
    folder = next(run_dir.glob("*_filter"), None) or run_dir / "03_filter"
    errors: list[BaseException] = []
    with SimProcess("--latency-ms", "200", "--jitter-ms", "50") as sim:
        services = {"llm_base_url": sim.base_url, "llm_api_key": DRY_RUN_API_KEY}
        runner = open_run(config, run_dir=run_dir, dry_run=True, services=services, progress=False, engine="ray")

        def go() -> None:
            try:
                runner.run({"filter"})
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=go)
        thread.start()
        deadline = time.monotonic() + 300
        while not list(folder.glob("shard-*.arrow")) and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        committed = len(list(folder.glob("shard-*.arrow")))
        victim = runner.engine.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        thread.join(600)
        stats = sim.stats()
    if errors:
        raise errors[0]
    shard_size = 40
    lost = rows_differing(reference, run_dir, "filter")
    out = {"worker_kill_lost": lost, "worker_kill_duplicates": stats["duplicates"],
           "worker_kill_inflight_bound": 2 * shard_size, "worker_kill_committed_before": committed,
           "worker_kill_shards": len(list(folder.glob("shard-*.arrow")))}
    print(f"kill: {out}", flush=True)
    return out


def rows_differing(reference: Path, run_dir: Path, stage: str) -> int:
    from builder.outputs import load_stage_output

    want = {json.dumps(r, sort_keys=True) for r in load_stage_output(reference, stage)}
    got = [json.dumps(r, sort_keys=True) for r in load_stage_output(run_dir, stage)]
    return len(want - set(got)) + (len(got) - len(set(got)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="images (= filter requests) of the budget run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0]
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            tmp = Path(tmp)
            same = identical(tmp)
            config, base = prepared(tmp, args.images)
            shared, reference = budget(config, base, tmp)
            killed = kill(config, base, reference, tmp)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    print(f"ray_identical={same['ray_identical']} shared_budget_utilisation={shared['shared_budget_utilisation']} "
          f"shared_budget_rate_429={shared['shared_budget_rate_429']} worker_kill_lost={killed['worker_kill_lost']} "
          f"worker_kill_duplicates={killed['worker_kill_duplicates']} "
          f"worker_kill_inflight_bound={killed['worker_kill_inflight_bound']} nodes={NODES} workers={WORKERS} "
          f"requests={shared['budget_requests']} load1={load:.1f}->{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
