#!/usr/bin/env python
"""The paper's scale on one node (issue 24, item 4): the whole pipeline under the simulator, at two sizes.

Every size is one dry run of all stages (taxonomy, images, match, filter, qa, score, final) in a child process of
its own, against the simulator in another process (``bench_llm.SimProcess``, zero latency), so the client's CPU
and memory are measured apart from the simulator's:

  taxonomy    19,227 task types imported from a ``~``-joined ``tasktype.txt`` (``import_tasktypes``,
              ``expand: false``), as the paper's released list; ``--tasktypes FILE`` uses a real one, else a
              synthetic one of ``--task-types`` leaves (3 levels) is written
  images      N synthetic images (``--sizes 2000,10000``)
  match       tiny CLIP (tg-tiny-clip), top 10 of the 19,227 task types
  filter/qa   one GPT endpoint; score: three endpoint referees, as scripts/bench_cost.py

Per stage and size: seconds per 1,000 input rows (``taskgalaxy status --json``: ``seconds`` / ``rows_in``), the
child's CPU seconds in the stage (``time.process_time``) over the requests the simulator received in it (its
``/_sim/stats``), and the child's peak RSS (``VmHWM``, reset at exec; ``ru_maxrss`` beside it). At the larger
size the CLI is timed: ``status --json``, ``export --format llava`` (which writes the sample browser too),
``push --local-dir`` (the browser too) and the sample browser alone (``write_browser``).

Last line ``key=value``:
  linearity                 the largest per-row cost ratio, larger size over smaller, over images, match, filter,
                            qa, score (goal <= 1.15)
  peak_rss_gb               the largest peak RSS of a run's client process (goal <= 2)
  score_client_rps          the score stage's referee requests over its seconds at the larger size: one client
                            process against a zero-latency simulator (goal >= 1,000)
  client_cpu_ms_per_request the child's CPU over every request it sent (larger size; includes the images and
                            match stages' CPU, which send none); llm_cpu_ms_per_request the filter, qa and score
                            stages' CPU over their requests; score_cpu_ms_per_request the score stage's alone
  images_parallel_speedup   the images stage at the smaller size under Ray on this node, two worker processes
                            over one (goal >= 1.6); ``na`` without Ray

``--image-store-gb G`` runs both sizes with ``llm.image_store_gb: G`` (the disk tier of image encodings; off in
the default config, so off here unless asked). ``--sizes 200,400`` is a smoke run. ``--child`` (internal) runs
one size in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

logger = logging.getLogger("bench_scale")
STAGES = ("taxonomy", "images", "match", "filter", "qa", "score", "final")
LINEAR_STAGES = ("images", "match", "filter", "qa", "score")  # the ones whose rows grow with N
PAPER_TASK_TYPES = 19_227
REFEREES = [
    {"name": "glm4v_9b", "preset": "glm-4v-9b", "endpoint": {"endpoint": "referee_a"}},
    {"name": "internvl_chat_v15", "preset": "internvl-chat-v1.5", "endpoint": {"endpoint": "referee_b"}},
    {"name": "internvl2_26b", "preset": "internvl2-26b", "endpoint": {"endpoint": "referee_c"}},
]

# Words for a synthetic task-type tree that reads like the paper's (three levels, `~`-joined).
DOMAINS = ("Optical character recognition", "Object detection", "Scene understanding", "Image captioning",
           "Visual reasoning", "Counting", "Spatial relations", "Attribute recognition", "Activity recognition",
           "Emotion recognition", "Document understanding", "Chart understanding", "Table understanding",
           "Medical imaging", "Remote sensing", "Art analysis", "Fashion analysis", "Food recognition",
           "Animal recognition", "Plant recognition", "Vehicle recognition", "Landmark recognition",
           "Sports analysis", "Traffic analysis", "Safety inspection", "Retail analysis", "Screenshot understanding",
           "Map reading", "Diagram understanding", "Math problem solving", "Logo recognition", "Face analysis",
           "Pose estimation", "Depth estimation", "Color recognition", "Material recognition", "Weather recognition",
           "Time estimation", "Text-rich image QA", "Meme understanding", "Comic understanding",
           "Interior design analysis", "Architecture analysis", "Industrial inspection", "Agricultural analysis",
           "Underwater scene analysis", "Aerial image analysis")
ASPECTS = ("object", "region", "scene", "text", "person", "group", "background", "foreground", "layout",
           "detail", "pattern", "shape", "count", "position", "relation", "state", "event", "style", "quality",
           "context")
ACTIONS = ("identification", "localization", "description", "comparison", "classification", "verification",
           "reasoning", "estimation", "grounding", "extraction", "summarization", "ranking", "matching",
           "segmentation", "tracking", "explanation", "prediction", "counting", "reading", "retrieval", "attribution",
           "inference")


def synthetic_tasktypes(path: Path, leaves: int) -> Path:
    """``leaves`` unique 3-level paths (level 1 ~ level 2 ~ leaf), at most ~21 children per parent."""
    seconds = [(d, f"{d} of {a}") for d in DOMAINS for a in ASPECTS]  # 47 x 20 = 940 second-level nodes
    per, extra = divmod(leaves, len(seconds))
    if per + 1 > len(ACTIONS):
        raise SystemExit(f"--task-types {leaves}: at most {len(seconds) * len(ACTIONS)} synthetic leaves")
    lines = []
    for i, (domain, second) in enumerate(seconds):
        aspect = second.rsplit(" of ", 1)[1]
        for action in ACTIONS[: per + (i < extra)]:
            lines.append(f"{domain}~{second}~{aspect.capitalize()} {action} in {domain.lower()}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config_for(images: int, tasktypes: Path, shard_size: int, seed: int, image_store_gb: float = 0.0) -> dict:
    gpt = {"model": "gpt-4o-2024-08-06", "image_detail": "low", "image_max_side": 512, "max_concurrency": 128,
           "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
    referee = {"api_key_env": None, "max_concurrency": 64}
    return {
        "run": {"name": "bench-scale", "shard_size": shard_size},
        "llm": {"image_store_gb": image_store_gb, "endpoints": {
            "gpt4o": gpt,
            "referee_a": {**referee, "base_url": "http://localhost:8001/v1", "model": "glm-4v-9b"},
            "referee_b": {**referee, "base_url": "http://localhost:8002/v1", "model": "internvl-chat-v1.5"},
            "referee_c": {**referee, "base_url": "http://localhost:8003/v1", "model": "internvl2-26b"},
        }},
        "stages": {
            "taxonomy": {"import_tasktypes": str(tasktypes), "expand": False, "plots": False},
            "images": {"sources": [{"type": "synthetic", "count": images, "seed": seed}]},
            "match": {"model": "tg-tiny-clip", "pretrained": None, "top_k": 10},
            "filter": {"endpoint": "gpt4o"},
            "qa": {"endpoint": "gpt4o"},
            "score": {"referees": REFEREES},
            "final": {"threshold": 2, "reports": False},
        },
    }


# ---------------------------------------------------------------------------------------------- the child


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(config: Path, run_dir: Path, base_url: str, out: Path) -> int:
    """One size: every stage in turn, in this process; CPU and simulator requests around each."""
    from processors.pipeline import DRY_RUN_API_KEY
    from processors.session import open_run
    from processors.simulator.thread import fetch_stats

    services = {"llm_base_url": base_url, "llm_api_key": DRY_RUN_API_KEY}
    per_stage = {}
    cpu0, wall0 = time.process_time(), time.monotonic()
    received0 = fetch_stats(base_url)["received"]
    for stage in STAGES:
        before_cpu, before_wall = time.process_time(), time.monotonic()
        before_received = fetch_stats(base_url)["received"]
        runner = open_run(config, run_dir=run_dir, dry_run=True, services=services, progress=False)
        runner.run({stage})
        per_stage[stage] = {"cpu_s": time.process_time() - before_cpu, "wall_s": time.monotonic() - before_wall,
                            "sim_received": fetch_stats(base_url)["received"] - before_received}
        print(f"  {stage}: {per_stage[stage]['wall_s']:.1f} s wall, {per_stage[stage]['cpu_s']:.1f} s CPU, "
              f"{per_stage[stage]['sim_received']} requests", flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(json.dumps({
        "stages": per_stage, "cpu_s": time.process_time() - cpu0, "wall_s": time.monotonic() - wall0,
        "sim_received": fetch_stats(base_url)["received"] - received0,
        "vm_hwm_bytes": vm_hwm_bytes(), "ru_maxrss_bytes": usage.ru_maxrss * 1024,
    }))
    return 0


# --------------------------------------------------------------------------------------------- the parent


def cli(*args: str, stdout=subprocess.DEVNULL) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "taskgalaxy.py"), *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"taskgalaxy {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, done


def status_json(run_dir: Path) -> tuple[float, dict[str, dict]]:
    seconds, done = cli("status", "--json", str(run_dir), stdout=subprocess.PIPE)
    return seconds, {s["stage"]: s for s in json.loads(done.stdout)}


def run_size(tmp: Path, sim, images: int, tasktypes: Path, shard_size: int, seed: int,
             image_store_gb: float = 0.0) -> dict:
    import yaml

    config = tmp / f"config-{images}.yaml"
    config.write_text(yaml.safe_dump(config_for(images, tasktypes, shard_size, seed, image_store_gb)))
    run_dir, out = tmp / f"run-{images}", tmp / f"child-{images}.json"
    print(f"size {images}:", flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, __file__, "--child", str(config), str(run_dir), sim.base_url, str(out)],
                   check=True)
    wall = time.monotonic() - started
    measured = json.loads(out.read_text())
    status_s, status = status_json(run_dir)
    stages = {}
    for name in STAGES:
        s = status[name]
        rows = s.get("rows_in") or s.get("rows_processed") or 0
        sent = measured["stages"][name]["sim_received"]
        stages[name] = {
            "rows_in": rows, "rows_out": s.get("rows_out"), "seconds": s.get("seconds", 0.0),
            "requests": s.get("requests", 0), "sim_requests": sent,
            "s_per_1k": 1000 * s.get("seconds", 0.0) / rows if rows else None,
            "cpu_ms_per_request": 1000 * measured["stages"][name]["cpu_s"] / sent if sent else None,
        }
    peak = measured["vm_hwm_bytes"] or measured["ru_maxrss_bytes"]
    result = {"images": images, "wall_s": wall, "run_dir": run_dir, "stages": stages, "peak_rss_bytes": peak,
              "ru_maxrss_bytes": measured["ru_maxrss_bytes"], "cpu_s": measured["cpu_s"],
              "requests": measured["sim_received"], "status_s": status_s,
              "cpu_ms_per_request": 1000 * measured["cpu_s"] / max(1, measured["sim_received"])}
    print(f"size {images}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB, {measured['sim_received']} requests, "
          f"client CPU {result['cpu_ms_per_request']:.2f} ms/request", flush=True)
    for name in STAGES:
        st = stages[name]
        per_1k = f"{st['s_per_1k']:.2f}" if st["s_per_1k"] is not None else "-"
        cpu = f"{st['cpu_ms_per_request']:.2f}" if st["cpu_ms_per_request"] is not None else "-"
        print(f"  {name:9s} rows_in {st['rows_in']:>7} rows_out {st['rows_out']:>7} {st['seconds']:8.2f} s  "
              f"{per_1k:>7} s/1k rows  requests {st['sim_requests']:>7}  client CPU {cpu} ms/request", flush=True)
    return result


def time_outputs(tmp: Path, run_dir: Path) -> dict:
    """status, export (LLaVA, with its browser), push --local-dir (with its browser), the browser alone."""
    out = {}
    out["status_s"], _ = status_json(run_dir)
    out["export_s"], _ = cli("export", str(run_dir), "--format", "llava", "--out", str(tmp / "export"))
    out["push_local_s"], _ = cli("push", str(run_dir), "--local-dir", str(tmp / "hub"))
    code = ("import sys, taskgalaxy; from pathlib import Path; "
            "taskgalaxy._browser_writer(Path(sys.argv[1]))(Path(sys.argv[2]))")
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code, str(run_dir), str(tmp / "browser-only")], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    out["browser_s"] = time.monotonic() - started
    print("outputs at the larger size: " + ", ".join(f"{k} {v:.1f} s" for k, v in out.items()), flush=True)
    return out


def images_parallel_speedup(tmp: Path, sim, images: int, tasktypes: Path, seed: int) -> str:
    """The images stage alone under the Ray engine on this node, one worker process against two (each with one
    decode thread, shards of 250 images): the span from the first shard's start to the last one's finish, so
    Ray's start-up is not counted. ``na`` without Ray (the ``ray`` extra)."""
    import importlib.util

    import yaml

    if importlib.util.find_spec("ray") is None:
        return "na"
    spans = {}
    for workers in (1, 2):
        config = config_for(images, tasktypes, 250, seed)
        config["run"]["ray_resources"] = {"images": {"workers": workers}}
        config["stages"]["images"]["workers"] = 1
        path, run_dir = tmp / f"images-ray-{workers}.yaml", tmp / f"images-ray-{workers}"
        path.write_text(yaml.safe_dump(config))
        cli("run", str(path), "--run-dir", str(run_dir), "--stages", "images", "--engine", "ray", "--no-progress",
            "--dry-run")
        stats = [json.loads(f.read_text()) for f in (run_dir / "01_images" / "stats").glob("shard-*.json")]
        spans[workers] = max(s["finished"] for s in stats) - min(s["started"] for s in stats)
        print(f"images under Ray, {workers} worker(s): {spans[workers]:.1f} s for {images} images", flush=True)
    return f"{spans[1] / spans[2]:.2f}"


def fmt(value) -> str:
    return "na" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000", help="two image counts, smaller first")
    parser.add_argument("--task-types", type=int, default=PAPER_TASK_TYPES, help="leaves of the synthetic list")
    parser.add_argument("--tasktypes", type=Path, help="a real tasktype.txt to import instead (e.g. the paper's)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--image-store-gb", type=float, default=0.0,
                        help="llm.image_store_gb of the runs (0, the default config's: no disk tier)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--child", nargs=4, metavar=("CONFIG", "RUN_DIR", "BASE_URL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        config, run_dir, base_url, out = args.child
        return child(Path(config), Path(run_dir), base_url, Path(out))

    from bench_llm import SimProcess

    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        parser.error("--sizes: two image counts, smaller first")
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if args.tasktypes:
            tasktypes = args.tasktypes.resolve()
        else:
            tasktypes = synthetic_tasktypes(tmp / "tasktype.txt", args.task_types)
        leaves = sum(1 for line in tasktypes.read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"task types: {leaves} lines from {tasktypes}", flush=True)
        with SimProcess() as sim:  # zero latency: the client is what is measured
            small = run_size(tmp, sim, sizes[0], tasktypes, args.shard_size, args.seed, args.image_store_gb)
            large = run_size(tmp, sim, sizes[1], tasktypes, args.shard_size, args.seed, args.image_store_gb)
            sim_stats = sim.stats()
        outputs = time_outputs(tmp, large["run_dir"])
        ratios = {}
        for name in LINEAR_STAGES:
            a, b = small["stages"][name]["s_per_1k"], large["stages"][name]["s_per_1k"]
            if a and b:
                ratios[name] = b / a
        print("per-row cost ratio (larger / smaller): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
              + f"; final {fmt(_ratio(small, large, 'final'))}", flush=True)
        worst = max(ratios, key=ratios.get) if ratios else None
        # The marginal cost per 1,000 rows (no fixed cost: model load, the 19,227 task-type embeddings) and
        # the fixed cost it implies: at small sizes the fixed part makes the per-row ratio look sublinear.
        for name in LINEAR_STAGES:
            a, b = small["stages"][name], large["stages"][name]
            if b["rows_in"] > a["rows_in"]:
                marginal = (b["seconds"] - a["seconds"]) / (b["rows_in"] - a["rows_in"])
                fixed = a["seconds"] - marginal * a["rows_in"]
                print(f"  {name:9s} marginal {1000 * marginal:7.2f} s/1k rows, fixed {fixed:6.1f} s", flush=True)
        llm = [large["stages"][n] for n in ("filter", "qa", "score")]
        llm_requests = sum(st["sim_requests"] for st in llm)
        llm_cpu_ms = (sum(st["cpu_ms_per_request"] * st["sim_requests"] for st in llm if st["sim_requests"])
                      / llm_requests) if llm_requests else None
        score = large["stages"]["score"]
        score_rps = score["sim_requests"] / score["seconds"] if score["seconds"] else None
        speedup = images_parallel_speedup(tmp, sim, sizes[0], tasktypes, args.seed)
        if speedup == "na":
            print("images_parallel_speedup=na: Ray is not installed (pip install -e '.[ray]')", flush=True)
        print(f"simulator: {sim_stats.get('received')} requests received in all", flush=True)
        if args.keep:
            print(f"kept {tmp}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    peak = max(small["peak_rss_bytes"], large["peak_rss_bytes"]) / 1e9
    per_1k = " ".join(f"{name}_s_per_1k={fmt(small['stages'][name]['s_per_1k'])}->"
                      f"{fmt(large['stages'][name]['s_per_1k'])}" for name in LINEAR_STAGES)
    print(f"linearity={fmt(ratios[worst]) if worst else 'na'} linearity_stage={worst} peak_rss_gb={peak:.2f} "
          f"score_client_rps={fmt(score_rps)} images_parallel_speedup={speedup} "
          f"client_cpu_ms_per_request={large['cpu_ms_per_request']:.2f} "
          f"llm_cpu_ms_per_request={fmt(llm_cpu_ms)} score_cpu_ms_per_request={fmt(score['cpu_ms_per_request'])} "
          f"{per_1k} "
          f"status_s={outputs['status_s']:.2f} export_s={outputs['export_s']:.1f} "
          f"push_local_s={outputs['push_local_s']:.1f} browser_s={outputs['browser_s']:.1f} "
          f"image_store_gb={args.image_store_gb:g} task_types={leaves} sizes={sizes[0]},{sizes[1]} "
          f"wall_s={small['wall_s']:.0f},{large['wall_s']:.0f} "
          f"load1={load:.1f}->{os.getloadavg()[0]:.1f}")
    return 0


def _ratio(small: dict, large: dict, name: str) -> float | None:
    a, b = small["stages"][name]["s_per_1k"], large["stages"][name]["s_per_1k"]
    return b / a if a and b else None


if __name__ == "__main__":
    sys.exit(main())
