"""Referee benchmark on the CPU: the original protocol against our batched, image-grouped scoring.

Original protocol (the released scripts): for every sample, open the image, run the processor and
``generate`` up to 2 new tokens, parse the digit — each image re-encoded once per question. Ours:
``LocalReferee.score`` (batched, grouped by image, one prefix pass per image + one suffix pass per batch,
reading the "0"/"1" logits). Also timed: ours with ``reuse=none`` (batched, each row encoded on its own),
which isolates the gain of the per-image reuse. Model: a random Llava of ~23M parameters built from
configs (processors.referees.tiny.BENCH_SPEC). The last line printed is ``key=value`` pairs.

    python scripts/bench_referee.py [--samples 200] [--images 70] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw  # noqa: E402

from processors.imageio import open_rgb  # noqa: E402
from processors.referees import RefereeItem, RefereeSettings  # noqa: E402

TASKS = [
    ("OCR~Scene text~Street sign reading", "What is written on the largest sign?"),
    ("Counting~Objects", "How many circles can be seen in the picture?"),
    ("Spatial reasoning~Relative position", "Which shape is closest to the top left corner?"),
    ("Color recognition", "What colour is the biggest rectangle?"),
    ("Scene understanding~Indoor or outdoor", "Is this scene indoors or outdoors?"),
]


def make_dataset(folder: Path, n_images: int, n_samples: int, seed: int = 0) -> list[RefereeItem]:
    """JPEGs of random shapes (320–640 px sides) and ~n_samples/n_images questions per image, shuffled."""
    rng = random.Random(seed)
    paths = []
    for i in range(n_images):
        image = Image.new("RGB", (rng.randint(320, 640), rng.randint(320, 640)), tuple(rng.choices(range(256), k=3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randint(0, image.width - 40), rng.randint(0, image.height - 40)
            box = (x, y, x + rng.randint(10, 120), y + rng.randint(10, 120))
            fill = tuple(rng.choices(range(256), k=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        path = folder / f"img{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    items = [
        RefereeItem(qa_id=f"qa{k:05d}", image_path=paths[k % n_images], task_type=t, question=q)
        for k, (t, q) in enumerate(rng.choice(TASKS) for _ in range(n_samples))
    ]
    rng.shuffle(items)
    return items


def original_protocol(model: Any, processor: Any, prompts: Sequence[str], items: Sequence[RefereeItem],
                      max_side: int | None) -> list[int | None]:
    """One ``generate`` per sample (max 2 new tokens), image decoded and encoded every time."""
    import torch

    answers: list[int | None] = []
    for prompt, item in zip(prompts, items):
        image = open_rgb(item.image_path, max_side=max_side)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        answers.append(int(text[0]) if text[:1] in ("0", "1") else None)
    return answers


def image_chunks(items: list[RefereeItem], n_chunks: int) -> list[list[RefereeItem]]:
    """Split the samples into ``n_chunks`` by image (an image's questions stay in one chunk)."""
    paths = sorted({item.image_path for item in items})
    chunk_of = {path: i * n_chunks // len(paths) for i, path in enumerate(paths)}
    return [[it for it in items if chunk_of[it.image_path] == c] for c in range(n_chunks)]


def run(model: Any, processor: Any, items: list[RefereeItem], batch_size: int, device: str,
        n_chunks: int = 5) -> dict[str, Any]:
    """Time the three ways after a short warm-up of each; returns the figures.

    The three are interleaved chunk by chunk (rotating which goes first), so load from other processes on a
    shared machine hits all three alike and the ratios stay meaningful.
    """
    import torch

    from processors.referees.local import LocalReferee

    def referee(reuse: str) -> LocalReferee:
        settings = RefereeSettings(name="bench", preset="tiny-random-llava", batch_size=batch_size,
                                   device=device, reuse=reuse, max_side=672)
        return LocalReferee(settings, model=model, processor=processor)

    ours, plain = referee("auto"), referee("none")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    methods = {
        "original": lambda chunk: original_protocol(model, processor, [ours.prompt(i) for i in chunk], chunk, 672),
        "ours": ours.score,
        "noreuse": plain.score,
    }
    for method in methods.values():  # warm-up: first calls pay for allocator and kernel selection
        method(items[: min(4, batch_size)])
    seconds = dict.fromkeys(methods, 0.0)
    results: dict[str, list[Any]] = {name: [] for name in methods}
    for c, chunk in enumerate(image_chunks(items, n_chunks)):
        names = list(methods)[c % 3:] + list(methods)[: c % 3]
        for name in names:
            sync()
            start = time.perf_counter()
            results[name].extend(methods[name](chunk))
            sync()
            seconds[name] += time.perf_counter() - start
    votes, plain_votes = results["ours"], results["noreuse"]
    agree = sum(a.vote == b.vote for a, b in zip(votes, plain_votes)) / len(items)
    max_dp = max(abs(a.p_yes - b.p_yes) for a, b in zip(votes, plain_votes))
    t_orig, t_ours, t_plain = seconds["original"], seconds["ours"], seconds["noreuse"]
    return {
        "speedup": round(t_orig / t_ours, 2), "reuse_gain": round(t_plain / t_ours, 2),
        "batching_gain": round(t_orig / t_plain, 2), "original_s": round(t_orig, 2), "ours_s": round(t_ours, 2),
        "noreuse_s": round(t_plain, 2), "samples_per_s": round(len(items) / t_ours, 1),
        "vote_agreement": agree, "max_p_yes_diff": f"{max_dp:.1e}",
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    from processors.referees.tiny import BENCH_SPEC, build_tiny_llava

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--images", type=int, default=70)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model, processor = build_tiny_llava(BENCH_SPEC, seed=0)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        items = make_dataset(Path(folder), args.images, args.samples)
        figures = run(model, processor, items, args.batch_size, "cpu")
    print(f"referee benchmark: {args.samples} samples over {args.images} images, random Llava {params_m:.1f}M, "
          f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    print(" ".join(f"{k}={v}" for k, v in {**figures, "params_m": round(params_m, 1),
                                          "samples": args.samples, "images": args.images,
                                          "batch_size": args.batch_size, "device": "cpu"}.items()))


if __name__ == "__main__":
    main()
