"""Decontamination for the ``final`` stage: no training sample may come from a benchmark.

- ``benchmark_image``: the sample's image has the same decoded pixels as a benchmark image (SHA-256 of the
  upright RGB pixels and size, decoded through ``processors.imageio.open_rgb``: EXIF orientation applied, so a
  copy that is only rotated by its EXIF tag matches, and a copy in another lossless format or with other
  metadata matches; a *lossy* re-encoding changes the pixels and is the near match's job), or a CLIP cosine at
  or above ``near_threshold`` with one (resized, recompressed or slightly cropped copies), with the match
  stage's model. Our images' vectors are the match stage's own where its coverage pass saved them
  (``NN_match/coverage/embeddings.npz``); only the others are embedded here. The cosines are taken a block at
  a time with a running best match, never as one [ours x theirs] matrix.
- ``benchmark_question``: the question shares a word n-gram (``ngram`` words: Unicode words, case folded) with a
  benchmark question; a question shorter than ``ngram`` words must equal one, and only when it has at least
  ``min_exact_words`` words (generic templates such as "What is shown in the image?" are no evidence).

A benchmark image that cannot be read (unreadable, a decompression bomb) is skipped with a warning, never a
crash; the count is in the log.

Why in ``final`` and not in ``images``: the benchmark lists change more often than anything else (a new
benchmark each month); in ``final`` a change re-runs only this cheap stage, while in ``images`` it would change
every fingerprint after it (CLIP, filter, QA, referees). The price is that the QA of a contaminated image is
generated before it is dropped — a small share of the spend, and the drop is counted in the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
WORD = re.compile(r"\w+")
HASH_THREADS = min(8, os.cpu_count() or 1)  # decoding releases the GIL
SIM_CHUNK = 4096  # rows of each side per similarity block


def pixel_hash(path: Path) -> str | None:
    """SHA-256 of the decoded, upright RGB pixels and the size; None (with a warning) when the file cannot be
    decoded: unreadable, truncated, or a decompression bomb (``open_rgb``'s pixel limit, PIL's bomb error)."""
    from PIL import Image

    from processors.imageio import open_rgb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            rgb = open_rgb(path)
        return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        logger.warning("decontamination: %s skipped, it cannot be decoded (%s: %s)", path, type(exc).__name__, exc)
        return None


def pixel_hashes(paths: Sequence[Path]) -> list[str | None]:
    """``pixel_hash`` of every path, on a few threads."""
    if len(paths) < 2:
        return [pixel_hash(p) for p in paths]
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="decontam-hash") as pool:
        return list(pool.map(pixel_hash, paths))


def words(text: str) -> list[str]:
    """Unicode words, case folded ("Größe" and "GRÖSSE" are one word; no letter is dropped)."""
    return WORD.findall((text or "").casefold())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class QuestionIndex:
    """The benchmark questions' ``n``-grams, and their whole questions shorter than ``n`` words (kept only from
    ``min_exact`` words up: a short template is no evidence of contamination)."""

    def __init__(self, questions: Iterable[str], n: int, min_exact: int = 8):
        self.n, self.min_exact = n, min_exact
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()
        for question in questions:
            tokens = words(question)
            if len(tokens) >= n:
                self.grams.update(ngrams(tokens, n))
            elif len(tokens) >= min_exact:
                self.short.add(tuple(tokens))

    def hit(self, question: str) -> str | None:
        tokens = words(question)
        if len(tokens) < self.n:
            return " ".join(tokens) if len(tokens) >= self.min_exact and tuple(tokens) in self.short else None
        return next((" ".join(g) for g in ngrams(tokens, self.n) if g in self.grams), None)


def read_questions(path: Path) -> list[str]:
    """One question per line, or JSON lines with a ``question`` key; empty ones (and JSON lines without the
    key) are skipped: an empty question would match every question with no word."""
    out, skipped = [], 0
    for line in filter(None, (ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines())):
        question = line
        if line.startswith("{"):
            try:
                question = json.loads(line).get("question")
            except (json.JSONDecodeError, AttributeError):
                question = None
        if isinstance(question, str) and words(question):
            out.append(question)
        else:
            skipped += 1
    if skipped:
        logger.warning("decontamination: %d lines of %s hold no question; skipped", skipped, path)
    return out


def _columns(benchmark) -> list[str]:
    return [benchmark.column] if isinstance(benchmark.column, str) else list(benchmark.column)


def benchmark_identity(config) -> list:
    """What identifies the benchmark sets for the final stage's fingerprint: a folder by a digest of its image
    files' names, sizes and modification times; a Hub dataset by id, config, split, columns and revision;
    a questions file by a digest of its content."""
    out: list = []
    for b in config.benchmark_images:
        if b.folder is not None:
            listing = hashlib.sha256()
            for p in _folder_images(Path(b.folder)):
                stat = p.stat()
                listing.update(f"{p.relative_to(b.folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            out.append({"name": b.name, "folder": listing.hexdigest()})
        else:
            out.append({"name": b.name, "hub": b.hub, "config": b.config, "split": b.split,
                        "columns": _columns(b), "revision": b.revision})
    for path in config.benchmark_questions:
        out.append({"questions": hashlib.sha256(Path(path).read_bytes()).hexdigest()})
    return out


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def benchmark_files(benchmark, cache_dir: Path) -> list[Path]:
    """The benchmark's images as files: a folder's own, or a Hub dataset's written once under the cache (row by
    row: the image column is never held in memory whole; rows whose image is None are skipped)."""
    if benchmark.folder is not None:
        return _folder_images(Path(benchmark.folder))
    import shutil
    import tempfile

    from processors.shared_files import exclusive

    key = hashlib.sha256(json.dumps([benchmark.hub, benchmark.config, benchmark.split, _columns(benchmark),
                                     benchmark.revision]).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "benchmarks" / key
    with exclusive(folder.with_name(f".{key}.lock")):
        if not (folder / "done").exists():
            import datasets

            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=folder.parent))
            rows = datasets.load_dataset(benchmark.hub, benchmark.config, split=benchmark.split,
                                         revision=benchmark.revision).select_columns(_columns(benchmark))
            written = 0
            for i, row in enumerate(rows):  # one decoded row at a time
                for column in _columns(benchmark):
                    image = row.get(column)
                    if image is None:
                        continue
                    try:
                        image.convert("RGB").save(tmp / f"{i:07d}-{column}.png")
                        written += 1
                    except (OSError, ValueError) as exc:
                        logger.warning("decontamination: %s row %d %s skipped (%s)", benchmark.name, i, column, exc)
            (tmp / "done").write_text(str(written))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    return sorted(folder.glob("*.png"))


def contamination_check(config, ctx):
    """The callable ``plan_final`` applies to the rows the protocol keeps: ``qa_id -> (reason, detail)``."""
    from processors.image_locator import ImageUnavailable, image_locator

    locate = image_locator(ctx)
    cache = Path(ctx.cache_dir)
    bench = [(b.name, p) for b in config.benchmark_images for p in benchmark_files(b, cache)]
    questions = QuestionIndex([q for f in config.benchmark_questions for q in read_questions(f)], config.ngram,
                              config.min_exact_words)

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
                                  "benchmark question" if len(gram.split()) >= config.ngram else
                                  f"equals the benchmark question {gram!r}")
        return claimed

    return check


def _image_matches(images: dict[str, Path], bench: list[tuple[str, Path]], config, ctx) -> dict[str, str]:
    """image_id -> why it is a benchmark image (exact pixels first, then CLIP near copies)."""
    hashes: dict[str, str] = {}
    bench_hashes = pixel_hashes([path for _, path in bench])
    for (name, path), digest in zip(bench, bench_hashes):
        if digest is not None:
            hashes.setdefault(digest, f"{name}: {path.name}")
    unreadable = sum(d is None for d in bench_hashes)
    if unreadable:
        logger.warning("decontamination: %d of %d benchmark images could not be decoded and are skipped",
                       unreadable, len(bench))
    found = {}
    ids = list(images)
    for image_id, digest in zip(ids, pixel_hashes([images[i] for i in ids])):
        if digest is not None and digest in hashes:
            found[image_id] = f"same pixels as {hashes[digest]}"
    rest = [i for i in ids if i not in found]
    usable = [j for j, digest in enumerate(bench_hashes) if digest is not None]
    if config.near_threshold is None or not rest or not usable:
        return found
    from processors.clip.coverage import embed_images, topk_rows
    from processors.clip.shared import get_matcher, release_matchers

    matcher = get_matcher(ctx.settings.stages.match, ctx.cache_dir)
    folder = Path(ctx.stage_dir) / "decontam"
    try:
        ours, bad_ours = _our_vectors(matcher, rest, images, ctx, folder)
        chosen = [bench[j] for j in usable]
        theirs, bad = embed_images(matcher, [str(p) for _, p in chosen], [p for _, p in chosen],
                                   folder / "benchmarks.npz")
        good = [j for j in range(len(chosen)) if j not in bad]
        if not good:
            return found
        device = matcher.clip.device
        for start, scores, index in topk_rows(ours, theirs[good], 1, SIM_CHUNK, device):  # running best match
            for row in range(len(scores)):
                position = start + row
                score = float(scores[row, 0])
                if position not in bad_ours and score >= config.near_threshold:
                    name, path = chosen[good[int(index[row, 0])]]
                    found[rest[position]] = f"CLIP cosine {score:.3f} with {name}: {path.name} (near copy)"
    finally:
        release_matchers()
    return found


def _our_vectors(matcher, ids: list[str], images: dict[str, Path], ctx, folder: Path):
    """Our images' CLIP vectors: the match stage's own where its coverage pass saved them under the same model,
    the rest embedded here. Returns (vectors [len(ids), dim], positions without a vector)."""
    import numpy as np

    from processors.clip.coverage import embed_images

    saved = _match_embeddings(ctx)
    vectors: dict[str, np.ndarray] = {}
    if saved is not None:
        position = {image_id: i for i, image_id in enumerate(saved["ids"])}
        for image_id in ids:
            i = position.get(image_id)
            if i is not None and i not in saved["errors"]:
                vectors[image_id] = saved["vectors"][i]
    missing = [i for i in ids if i not in vectors]
    bad: set[int] = set()
    if missing:
        fresh, errors = embed_images(matcher, missing, [images[i] for i in missing], folder / "images.npz")
        for k, image_id in enumerate(missing):
            if k not in errors:
                vectors[image_id] = fresh[k]
    logger.info("decontamination: %d of %d images' vectors reused from the match stage", len(ids) - len(missing),
                len(ids))
    dim = next((v.shape[0] for v in vectors.values()), 1)
    out = np.zeros((len(ids), dim), dtype=np.float32)
    for k, image_id in enumerate(ids):
        if image_id in vectors:
            out[k] = vectors[image_id]
        else:
            bad.add(k)
    return out, bad


def _match_embeddings(ctx) -> dict | None:
    """The coverage pass's saved embeddings, when the match stage ran with the model configured now."""
    import numpy as np

    from builder.outputs import stage_state

    try:
        folder, state = stage_state(Path(ctx.run_dir), "match")
    except Exception:  # noqa: BLE001 - no match stage in this run folder: embed here
        return None
    path = Path(folder) / "coverage" / "embeddings.npz"
    current = ctx.settings.stages.match
    ran = state.get("config") or {}
    if not path.exists() or ran.get("model") != current.model or ran.get("pretrained") != current.pretrained:
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {"ids": [str(i) for i in saved["ids"]], "vectors": saved["vectors"],
                    "errors": set(int(i) for i in saved["error_pos"])}
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("decontamination: the match stage's embeddings %s are unreadable (%s): embedding here",
                       path, exc)
        return None


__all__ = ["QuestionIndex", "benchmark_identity", "contamination_check", "pixel_hash"]
