"""Peak RSS of the images stage on hostile input (issue 13, point 6); the last line is ``key=value`` pairs.

The hostile case: ``--images`` (4) 9000x9000 RGBA PNGs of smooth content (~330 KB each, 324 MB of pixels
each), one folder source, ``workers: 4``. Each measurement runs the stage through the ``Runner`` in a fresh
Python process and reports that process's own peak (``ru_maxrss`` of ``RUSAGE_SELF``), so one measurement
never leaks into the next:

- ``before``: the code of ``git archive HEAD`` (the last commit; a read-only export into a temporary folder,
  no worktree), or ``--before-code DIR``;
- ``after``: this working tree with its defaults (``memory_budget_mb: 512``);
- ``after_no_budget``: this working tree with ``memory_budget_mb: 1000000``, i.e. only the leaner decode
  (post-decode work on a small copy), every worker decoding at once.

``ratio`` = before / after. ``base_rss_mb`` is the after-process's RSS once everything is imported, before
the stage runs. Usage: python scripts/bench_image_memory.py [--images 4] [--side 9000] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
code, photos, run_dir, images = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
sys.path.insert(0, code)
import builder
from builder.config import build_config_model, validate_config
from builder.runner import Runner
from processors.stages.images import ImagesStage

assert builder.__file__.startswith(code), f"imported {builder.__file__}, not the code under {code}"
stages = [ImagesStage()]
config = validate_config({"run": {"name": "bench"}, "stages": {"images": {
    "sources": [{"type": "folder", "root": photos}], **images}}}, build_config_model(stages), base_dir=code)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
totals = Runner(stages, config, run_dir, progress=False).run()["images"]["totals"]
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_kb": base,
                  "seconds": time.monotonic() - started, "rows_out": totals["rows_out"], "failed": totals["failed"]}))
"""


def make_hostile_pngs(folder: Path, count: int, side: int) -> list[Path]:
    """Smooth RGBA gradients, each turned differently so that no two are duplicates."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = Image.linear_gradient("L").resize((side, side))
    turns = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
             Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM]
    paths = []
    for i in range(count):
        other = grey.transpose(turns[(i + 1) % len(turns)]) if turns[(i + 1) % len(turns)] else grey
        alpha = grey.transpose(turns[i % len(turns)]) if turns[i % len(turns)] else grey
        path = folder / f"hostile-{i}.png"
        Image.merge("RGBA", (grey, other, grey.point(lambda v, k=i: (v + 37 * k) % 256), alpha)).save(path)
        paths.append(path)
    return paths


def make_in_child(folder: Path, count: int, side: int) -> list[Path]:
    """``make_hostile_pngs`` in a child process: this process stays small, and that matters, because on Linux a
    child's ``ru_maxrss`` starts at the RSS of the process it was forked from."""
    code = f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); import bench_image_memory as b; " \
           f"b.make_hostile_pngs(b.Path({str(folder)!r}), {count}, {side})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return sorted(folder.glob("hostile-*.png"))


def export_head(dest: Path) -> Path:
    """The last commit's files, exported read-only (``git archive``): no worktree, no change to git state."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def measure(code: Path, photos: Path, run_dir: Path, images: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(code), str(photos), str(run_dir), json.dumps(images)],
                          capture_output=True, text=True, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"measurement under {code} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {code}: {images} -> peak {result['peak_kb'] / 1024:.0f} MB, {result['seconds']:.1f} s, "
          f"{result['rows_out']} rows, failed {result['failed']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--side", type=int, default=9000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--before-code", help="a checkout of the code to compare with (default: git archive HEAD)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-image-memory-") as tmp:
        tmp = Path(tmp)
        files = make_in_child(tmp / "photos", args.images, args.side)
        print(f"{len(files)} x {args.side}x{args.side} RGBA PNGs, {files[0].stat().st_size / 1024:.0f} KB each, "
              f"{args.side * args.side * 4 / 2**20:.0f} MB of pixels each", flush=True)
        before_code = Path(args.before_code) if args.before_code else export_head(Path(tempfile.mkdtemp(dir=tmp)))
        workers = {"workers": args.workers}
        before = measure(before_code, tmp / "photos", tmp / "run-before", workers)
        after = measure(REPO, tmp / "photos", tmp / "run-after", workers)
        unbounded = measure(REPO, tmp / "photos", tmp / "run-no-budget", {**workers, "memory_budget_mb": 1_000_000})
    mb = {name: r["peak_kb"] / 1024 for name, r in (("before", before), ("after", after), ("no_budget", unbounded))}
    print(f"images={args.images} side={args.side} workers={args.workers} base_rss_mb={after['base_kb'] / 1024:.0f} "
          f"before_peak_rss_mb={mb['before']:.0f} after_peak_rss_mb={mb['after']:.0f} "
          f"after_no_budget_peak_rss_mb={mb['no_budget']:.0f} before_s={before['seconds']:.1f} "
          f"after_s={after['seconds']:.1f} ratio={mb['before'] / mb['after']:.2f}")


if __name__ == "__main__":
    main()
