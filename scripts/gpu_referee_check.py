"""GPU part of the referee benchmark: a random-weight Llava with llava-1.5-7b's shapes (CLIP ViT-L/14-336 +
a 7B Llama decoder, bf16), 200 samples over 70 images, the original per-sample ``generate`` protocol against
our batched, image-grouped scoring (goal: speedup ≥ 10). Self-contained: builds the model from configs
(no download), draws its own images; about a minute on an H100 after imports.

    python scripts/gpu_referee_check.py [--samples 200] [--images 70] [--batch-size 32] [--small]

``--small`` runs the CPU benchmark's 23M model instead (a smoke test where there is no GPU). The last line
printed is ``key=value`` pairs (``speedup=``, ``reuse_gain=``, ``gpu=``...).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_referee import make_dataset, run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    import torch

    from processors.referees.tiny import BENCH_SPEC, LLAVA_7B_SPEC, build_tiny_llava

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--images", type=int, default=70)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="23M model on the CPU (smoke test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.small:
        print("no CUDA device: run with --small for a CPU smoke test")
        print("status=skipped reason=no_cuda")
        return
    spec, dtype = (BENCH_SPEC, torch.float32) if args.small else (LLAVA_7B_SPEC, torch.bfloat16)
    start = time.perf_counter()
    model, processor = build_tiny_llava(spec, seed=0, device=device, dtype=dtype)
    build_s = time.perf_counter() - start
    params_b = sum(p.numel() for p in model.parameters()) / 1e9
    gpu = torch.cuda.get_device_name(0).replace(" ", "_") if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as folder:
        items = make_dataset(Path(folder), args.images, args.samples)
        figures = run(model, processor, items, args.batch_size, device)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    print(f"referee GPU check: random Llava {params_b:.2f}B ({dtype}) on {gpu}, built in {build_s:.0f}s")
    pairs = {**figures, "params_b": round(params_b, 2), "samples": args.samples, "images": args.images,
             "batch_size": args.batch_size, "peak_mem_gb": round(peak_gb, 1), "gpu": gpu,
             "goal_speedup": 10, "pass": int(figures["speedup"] >= 10) if device == "cuda" else "n/a"}
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
