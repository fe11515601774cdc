"""Benchmark CLIP matching: the released code's loop vs ours, and peak memory as the image count grows.

CPU mode (default; issue 6): ViT-B-32 with random weights (same cost as real ones), >= 300 JPEGs of 640x480,
>= 2,000 task types. The *original* loop decodes in the main thread and runs batch 1 with a matmul and top-k
per image; *ours* is ``ClipMatcher.match`` (DataLoader workers, batches, chunked top-k on the device). The
two run in alternating rounds and each reports its median, because this machine is shared.
``--rss`` adds peak RSS of a whole ``match`` stage run (tiny model) over 5k vs 20k small images, each in a
fresh child process.

GPU mode (``--gpu``; run by scripts/gpu_check.sh): ViT-L-14-quickgelu, bf16, 10,000 JPEGs: end-to-end img/s
(one call, and in calls of 2,000 = the paper config's shard), the data path alone, model-only img/s on ready
tensors (compiled as the stage runs it, and eager), and the original loop's img/s.

The last line printed is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_clip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tg-bench-clip"), help="images + text cache")
    parser.add_argument("--gpu", action="store_true", help="the GPU check (ViT-L-14-quickgelu, bf16)")
    parser.add_argument("--model", default=None, help="default ViT-B-32 (CPU) / ViT-L-14-quickgelu (GPU)")
    parser.add_argument("--images", type=int, default=None, help="default 300 (CPU) / 5000 (GPU)")
    parser.add_argument("--tasks", type=int, default=None, help="default 2000 (CPU) / 19227 (GPU, the paper's)")
    parser.add_argument("--original-images", type=int, default=300, help="images timed in the original loop")
    parser.add_argument("--rounds", type=int, default=3, help="alternating original/ours rounds (CPU)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--device", default=None, help="default cpu / cuda (--gpu --device cpu: a smoke test)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="stages.match.compile (auto = on a GPU)")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS for 5k vs 20k images")
    parser.add_argument("--stage", action="store_true",
                        help="time the match stage through the Runner instead (img/s per --stage-shards size)")
    parser.add_argument("--stage-shards", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("ViT-L-14-quickgelu" if args.gpu else "ViT-B-32")
    args.images = args.images or (10000 if args.gpu else 300)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.tasks = args.tasks or (19227 if args.gpu else 2000)
    return args


# -- inputs -----------------------------------------------------------------------------------------------
def _draw_jpeg(job: tuple[Path, int, tuple[int, int]]) -> None:
    """A photo-like JPEG (smooth gradients, shapes, mild noise): decodes like a real photo, unlike pure noise."""
    from PIL import Image, ImageDraw

    path, seed, (width, height) = job
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(x * rng.uniform(0.1, 0.6) + y * rng.uniform(0.1, 0.6) + rng.uniform(0, 255)) % 256
                     for _ in range(3)], axis=-1)
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.save(path, quality=90)


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` JPEGs of ``size`` in ``folder`` (kept between runs; drawn in parallel when missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:06d}.jpg" for i in range(count)]
    jobs = [(p, i, size) for i, p in enumerate(paths) if not p.exists()]
    if jobs:
        logger.info("drawing %d JPEGs of %dx%d in %s", len(jobs), *size, folder)
        with Pool() as pool:
            pool.map(_draw_jpeg, jobs, chunksize=64)
    return paths


def task_paths(count: int) -> list[str]:
    """``count`` three-level task paths with readable, distinct words (the text tower sees real tokens)."""
    words = ["chart", "street", "menu", "animal", "vehicle", "weather", "room", "sign", "face", "map", "math",
             "table", "plant", "sport", "food", "tool", "art", "logo", "text", "crowd"]
    out = []
    for i in range(count):
        a, b, c = i % 20, (i // 20) % 20, i // 400
        out.append(f"{words[a]} understanding~{words[b]} {words[a]} analysis~{words[c % 20]} {words[b]} "
                   f"detail {i}")
    return out


# -- the two loops --------------------------------------------------------------------------------------
def original_loop(matcher, paths: list[Path], k: int) -> float:
    """The released code's shape: main-thread decode, batch 1, one matmul + top-k per image. Returns img/s.

    It normalises correctly here (the axis bug costs the same time): only the data path is compared.
    """
    import torch

    from processors.imageio import open_rgb

    clip, bank = matcher.clip, matcher._bank_on_device
    sync = torch.cuda.synchronize if clip.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    with torch.inference_mode(), clip.autocast():
        for path in paths:
            pixels = clip.preprocess(open_rgb(path)).unsqueeze(0).to(clip.device)
            features = clip.model.encode_image(pixels).float()
            features = features / features.norm(dim=-1, keepdim=True)
            scores, index = (100.0 * features @ bank.T).softmax(dim=-1).topk(k)
            scores.cpu().tolist(), index.cpu().tolist()
    sync()
    return len(paths) / (time.perf_counter() - start)


def our_loop(matcher, paths: list[Path]) -> float:
    start = time.perf_counter()
    done = sum(1 for _, result in matcher.match(paths) if isinstance(result, list))
    if done != len(paths):
        raise RuntimeError(f"only {done} of {len(paths)} images matched")
    return len(paths) / (time.perf_counter() - start)


def model_only(matcher, batch_size: int, iterations: int = 10, eager: bool = False) -> float:
    """img/s of encode + top-k on tensors already in memory (the ceiling for the data path). ``eager``: the
    plain image tower, never the compiled one."""
    import torch

    from processors.clip.topk import topk_cosine
    from processors.clip.text import normalize_rows

    clip = matcher.clip
    size = clip.preprocess.transforms[1].size
    pixels = torch.randn(batch_size, 3, *size).to(clip.device)
    sync = torch.cuda.synchronize if clip.device.type == "cuda" else (lambda: None)

    def encode(x):
        if not eager:
            return matcher.encode_images(x)
        with clip.autocast():
            return normalize_rows(clip.model.encode_image(x))

    with torch.inference_mode():
        for _ in range(2):
            encode(pixels)
        sync()
        start = time.perf_counter()
        for _ in range(iterations):
            topk_cosine(encode(pixels), matcher._bank_on_device, 10)[0].cpu()
        sync()
    return batch_size * iterations / (time.perf_counter() - start)


def build_matcher(args, cache_dir: Path):
    from processors.clip.config import ClipMatchConfig
    from processors.clip.matcher import ClipMatcher

    config = ClipMatchConfig(model=args.model, pretrained=None, device=args.device,
                             batch_size=args.batch_size, num_workers=args.num_workers, top_k=args.top_k,
                             task_types="all",
                             compile={"auto": "auto", "on": True, "off": False}[args.compile])
    matcher = ClipMatcher(config, cache_dir)
    paths = task_paths(args.tasks)
    start = time.perf_counter()
    bank = matcher.set_tasks([f"t{i}" for i in range(len(paths))], paths)
    return matcher, {"text_s": round(time.perf_counter() - start, 1), "text_source": bank.source}


# -- whole stage runs through the Runner ----------------------------------------------------------------------
def run_match_stage(run_dir: Path, images: list[Path], image_root: Path, tasks: int, match: dict,
                    shard_size: int) -> dict:
    """taxonomy -> images -> match through the Runner (the two sources list fixed rows); the match state."""
    import datasets

    from builder.config import build_config_model, validate_config
    from builder.rows import BatchOutput
    from builder.runner import Runner
    from builder.stage import Stage, StageConfig
    from processors.stages.match import MatchStage

    class Source(Stage):
        """A source stage that lists fixed rows (the real taxonomy/images stages are other modules)."""

        def __init__(self, name: str, key: str, rows: dict[str, list], roots: dict | None = None):
            self.name, self.key, self.rows, self.Config, self.roots = name, key, rows, StageConfig, roots

        def finalize(self, config, ctx, output):
            if self.roots:  # how the images stage tells readers where "<root>/<file>" paths lie
                from loaders.images.paths import ROOTS_FILE, write_roots

                write_roots(ctx.stage_dir / ROOTS_FILE, ctx.run_dir, self.roots)

        def input_key(self, config):
            return self.key

        def source_rows(self, config, ctx):
            return datasets.Dataset.from_dict(self.rows)

        def features(self, config):
            return datasets.Features({c: datasets.Value("string") for c in self.rows})

        def make_batch_fn(self, config, ctx):
            def fn(batch):
                out = BatchOutput(list(self.rows))
                for i, key in enumerate(batch[self.key]):
                    out.add(key, {c: batch[c][i] for c in self.rows})
                return out.to_columns()

            return fn

    paths = task_paths(tasks)
    stages = [Source("taxonomy", "task_id", {"task_id": [f"t{i}" for i in range(len(paths))], "path": paths}),
              Source("images", "image_id", {"image_id": [p.stem for p in images],
                                            "path": [f"pics/{p.name}" for p in images]}, {"pics": image_root}),
              MatchStage()]
    config = validate_config({"run": {"name": "bench", "shard_size": 100_000},
                              "stages": {"match": {**match, "shard_size": shard_size}}},
                             build_config_model(stages), base_dir=run_dir.parent)
    # Only the match stage is redone: the sources stay, and so does the matcher (model, compiled tower, text
    # bank, decode workers) of an earlier call in this process, as across the shards of one run.
    for folder in run_dir.glob("*_match"):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    return Runner(stages, config, run_dir, progress=False).run()["match"]


def shard_seconds(run_dir: Path) -> list[tuple[int, float]]:
    """(rows, seconds) of every finished match shard, in order."""
    import json

    stats = sorted(next(run_dir.glob("*_match")).glob("stats/shard-*.json"))
    return [(d["rows_in"], d["seconds"]) for d in (json.loads(f.read_text()) for f in stats)]


def stage_bench(args) -> dict:
    """The match *stage* as a run uses it (Runner, Arrow shards, path checks): img/s per shard size, without
    the first shard (model load, text bank, compile) and with it."""
    images = make_jpegs(args.work / "jpeg640", args.images, (640, 480))
    match = {"model": args.model, "pretrained": None, "device": args.device, "top_k": args.top_k,
             "task_types": "all", "compile": {"auto": "auto", "on": True, "off": False}[args.compile]}
    if args.batch_size:
        match["batch_size"] = args.batch_size
    found = {}
    run_dir = args.work / "stage-run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    for shard in args.stage_shards:
        start = time.perf_counter()
        state = run_match_stage(run_dir, images, args.work / "jpeg640", args.tasks, match, shard)
        total = time.perf_counter() - start
        assert state["totals"]["rows_out"] == len(images), state["totals"]
        later = shard_seconds(run_dir)[1:]
        found[f"stage_shard{shard}_img_s"] = round(sum(r for r, _ in later) / sum(t for _, t in later), 1) if later else "n/a"
        found[f"stage_shard{shard}_total_s"] = round(total, 1)
    return found


def rss_child(count: int, work: Path) -> None:
    """Run taxonomy -> images -> match through the Runner over ``count`` small JPEGs; print peak RSS (MiB)."""
    images = make_jpegs(work / "small", count, (96, 72))[:count]
    match = {"model": "tg-tiny-clip", "pretrained": None, "device": "cpu", "num_workers": 1, "batch_size": 64}
    run_dir = work / f"rss-run-{count}"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    start = time.perf_counter()
    state = run_match_stage(run_dir, images, work / "small", 2000, match, 1000)
    seconds = time.perf_counter() - start
    assert state["totals"]["rows_out"] == count, state["totals"]
    print(f"rss_mib={peak_rss_mib():.0f} seconds={seconds:.1f}")


def peak_rss_mib() -> float:
    """This process's peak RSS. Not ``ru_maxrss``: Linux carries that over fork + exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(work: Path) -> dict[str, float]:
    make_jpegs(work / "small", 20000, (96, 72))
    found = {}
    for count in (5000, 20000):
        line = subprocess.run([sys.executable, __file__, "--rss-child", str(count), "--work", str(work)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        values = dict(part.split("=") for part in line.split())
        found[f"rss_{count // 1000}k_mib"] = float(values["rss_mib"])
        found[f"rss_{count // 1000}k_s"] = float(values["seconds"])
    found["rss_growth"] = round(found["rss_20k_mib"] / found["rss_5k_mib"] - 1, 3)
    return found


# -- main ---------------------------------------------------------------------------------------------------
def cpu_bench(args) -> dict:
    import torch

    paths = make_jpegs(args.work / "jpeg640", args.images, (640, 480))
    matcher, found = build_matcher(args, args.work / "cache")
    our_loop(matcher, paths[:32])  # warm-up: first forward passes allocate
    original, ours = [], []
    for _ in range(args.rounds):
        original.append(original_loop(matcher, paths[: args.original_images], args.top_k))
        ours.append(our_loop(matcher, paths))
    found.update(
        original_img_s=round(statistics.median(original), 2),
        ours_img_s=round(statistics.median(ours), 2),
        original_rounds="/".join(f"{v:.1f}" for v in original),
        ours_rounds="/".join(f"{v:.1f}" for v in ours),
        model_only_img_s=round(model_only(matcher, args.batch_size or 16, iterations=6), 2),
        threads=torch.get_num_threads(),
    )
    found["speedup"] = round(found["ours_img_s"] / found["original_img_s"], 2)
    return found


def decode_only(matcher, paths: list[Path]) -> float:
    """img/s of the data path alone (workers decode + preprocess, batches joined on the device, no model)."""
    start = time.perf_counter()
    done = sum(len(batch.indices) for batch in matcher.iter_batches(paths))
    return done / (time.perf_counter() - start)


def shard_calls(matcher, paths: list[Path], shard: int) -> float:
    """img/s when the images come in shard-sized ``match`` calls, as the runner gives them (each call fills
    and drains the pipeline once)."""
    start = time.perf_counter()
    for first in range(0, len(paths), shard):
        our_loop(matcher, paths[first : first + shard])
    return len(paths) / (time.perf_counter() - start)


def gpu_bench(args) -> dict:
    import torch

    paths = make_jpegs(args.work / "jpeg640", args.images, (640, 480))
    matcher, found = build_matcher(args, args.work / "cache")
    cuda = matcher.clip.device.type == "cuda"
    start = time.perf_counter()
    our_loop(matcher, paths[:1024])  # warm-up: compile, kernels, allocator, worker start
    found["warmup_s"] = round(time.perf_counter() - start, 1)
    found["compiled"] = int(matcher.compiled)
    found["decode_only_img_s"] = round(decode_only(matcher, paths), 1)
    found["ours_img_s"] = round(our_loop(matcher, paths), 1)
    found["ours_shard2000_img_s"] = round(shard_calls(matcher, paths, 2000), 1)
    found["model_only_img_s"] = round(model_only(matcher, matcher.batch_size), 1)
    found["model_only_eager_img_s"] = round(model_only(matcher, matcher.batch_size, eager=True), 1)
    original_loop(matcher, paths[:20], args.top_k)
    found["original_img_s"] = round(original_loop(matcher, paths[: args.original_images], args.top_k), 1)
    found["speedup"] = round(found["ours_img_s"] / found["original_img_s"], 1)
    found["of_model_only"] = round(found["ours_img_s"] / found["model_only_img_s"], 2)
    found["gpu"] = torch.cuda.get_device_name().replace(" ", "_") if cuda else "none"
    found["cpus"] = len(os.sched_getaffinity(0))
    if cuda:
        found["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    found["pass"] = int(found["ours_img_s"] >= 2000 and found["speedup"] >= 20)
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("bench_clip", "processors"):  # open_clip logs chatty INFO lines on the root logger
        logging.getLogger(name).setLevel(logging.INFO)
    if args.rss_child:
        rss_child(args.rss_child, args.work)
        return 0
    found = {"model": args.model, "images": args.images, "tasks": args.tasks}
    load_before = os.getloadavg()[0]
    if args.stage:
        found.update(stage_bench(args))
    else:
        found.update(gpu_bench(args) if args.gpu else cpu_bench(args))
    found["load1"] = f"{load_before:.1f}->{os.getloadavg()[0]:.1f}"  # other processes sharing the cores
    if args.rss:
        found.update(measure_rss(args.work))
    print(" ".join(f"{k}={v}" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
