"""Decontamination for the ``final`` stage: no training sample may come from a benchmark.

- ``benchmark_image``: the sample's image has the same decoded pixels as a benchmark image (SHA-256 of the
  RGB pixels and size: immune to re-encoding, format and metadata), or a CLIP cosine at or above
  ``near_threshold`` with one (resized, recompressed or slightly cropped copies), with the match stage's model.
- ``benchmark_question``: the question shares a word n-gram (``ngram`` words, lower-cased, punctuation
  dropped) with a benchmark question; a question shorter than ``ngram`` words must equal one.

Why in ``final`` and not in ``images``: the benchmark lists change more often than anything else (a new
benchmark each month); in ``final`` a change re-runs only this cheap stage, while in ``images`` it would change
every fingerprint after it (CLIP, filter, QA, referees). The price is that the QA of a contaminated image is
generated before it is dropped — a small share of the spend, and the drop is counted in the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
WORD = re.compile(r"[a-z0-9]+")


def pixel_hash(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    except (OSError, ValueError):
        return None


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class QuestionIndex:
    def __init__(self, questions: Iterable[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()
        for question in questions:
            tokens = words(question)
            (self.grams.update(ngrams(tokens, n)) if len(tokens) >= n else self.short.add(tuple(tokens)))

    def hit(self, question: str) -> str | None:
        tokens = words(question)
        if len(tokens) < self.n:
            return " ".join(tokens) if tuple(tokens) in self.short else None
        return next((" ".join(g) for g in ngrams(tokens, self.n) if g in self.grams), None)


def read_questions(path: Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for line in filter(None, (ln.strip() for ln in lines)):
        if line.startswith("{"):
            out.append(str(json.loads(line).get("question", "")))
        else:
            out.append(line)
    return out


def benchmark_files(benchmark, cache_dir: Path) -> list[Path]:
    """The benchmark's images as files: a folder's own, or a Hub dataset's written once under the cache."""
    if benchmark.folder is not None:
        return sorted(p for p in Path(benchmark.folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    import datasets

    key = hashlib.sha256(f"{benchmark.hub}|{benchmark.config}|{benchmark.split}|{benchmark.column}".encode()).hexdigest()[:16]
    folder = cache_dir / "benchmarks" / key
    done = folder / "done"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rows = datasets.load_dataset(benchmark.hub, benchmark.config, split=benchmark.split)
        for i, image in enumerate(rows[benchmark.column]):
            image.convert("RGB").save(folder / f"{i:07d}.png")
        done.write_text("")
    return sorted(folder.glob("*.png"))


def contamination_check(config, ctx):
    """The callable ``plan_final`` applies to the rows the protocol keeps: ``qa_id -> (reason, detail)``."""
    from processors.image_locator import ImageUnavailable, image_locator

    locate = image_locator(ctx)
    cache = Path(ctx.cache_dir)
    bench = [(b.name, p) for b in config.benchmark_images for p in benchmark_files(b, cache)]
    questions = QuestionIndex([q for f in config.benchmark_questions for q in read_questions(f)], config.ngram)

    def check(rows: dict[str, list]) -> dict[str, tuple[str, str]]:
        claimed: dict[str, tuple[str, str]] = {}
        images: dict[str, Path] = {}
        for image_id in dict.fromkeys(rows["image_id"]):
            try:
                images[image_id] = locate(image_id)
            except ImageUnavailable:
                continue
        matched = _image_matches(images, bench, config, ctx) if bench else {}
        for qa_id, image_id, question in zip(rows["qa_id"], rows["image_id"], rows["question"]):
            if image_id in matched:
                claimed[qa_id] = ("benchmark_image", matched[image_id])
                continue
            gram = questions.hit(question)
            if gram is not None:
                claimed[qa_id] = ("benchmark_question", f"shares the {config.ngram}-gram {gram!r} with a "
                                  "benchmark question")
        return claimed

    return check


def _image_matches(images: dict[str, Path], bench: list[tuple[str, Path]], config, ctx) -> dict[str, str]:
    """image_id -> why it is a benchmark image (exact pixels first, then CLIP near copies)."""
    hashes = {}
    for name, path in bench:
        digest = pixel_hash(path)
        if digest is not None:
            hashes.setdefault(digest, f"{name}: {path.name}")
    found = {}
    for image_id, path in images.items():
        digest = pixel_hash(path)
        if digest in hashes:
            found[image_id] = f"same pixels as {hashes[digest]}"
    rest = [i for i in images if i not in found]
    if config.near_threshold is None or not rest:
        return found
    from processors.clip.coverage import embed_images
    from processors.stages.match import get_matcher, release_matchers

    matcher = get_matcher(ctx.settings.stages.match, ctx.cache_dir)
    folder = Path(ctx.stage_dir) / "decontam"
    try:
        ours, errors = embed_images(matcher, rest, [images[i] for i in rest], folder / "images.npz")
        theirs, bad = embed_images(matcher, [str(p) for _, p in bench], [p for _, p in bench], folder / "benchmarks.npz")
    finally:
        release_matchers()
    good = [j for j in range(len(bench)) if j not in bad]
    if not good:
        return found
    sims = ours @ theirs[good].T
    best = sims.argmax(axis=1)
    for row, image_id in enumerate(rest):
        score = float(sims[row, best[row]])
        if row not in errors and score >= config.near_threshold:
            name, path = bench[good[best[row]]]
            found[image_id] = f"CLIP cosine {score:.3f} with {name}: {path.name} (near copy)"
    return found


__all__ = ["QuestionIndex", "contamination_check", "pixel_hash"]
