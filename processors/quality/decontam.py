"""Decontamination for the ``final`` stage: no training sample may come from a benchmark.

- ``benchmark_image``: the sample's image has the same decoded pixels as a benchmark image (SHA-256 of the
  upright RGB pixels and size, decoded through ``processors.imageio.open_rgb``: EXIF orientation applied, so a
  copy that is only rotated by its EXIF tag matches, and a copy in another lossless format or with other
  metadata matches; a *lossy* re-encoding changes the pixels and is the near match's job), or is a near copy
  (resized, recompressed or slightly cropped) by either of two checks, each optional:
  ``near_hash_distance``: the images stage's 64-bit dHash (its ``phash`` column, so our images are not decoded
  for it; ``processors.image_validate.dhash`` of the benchmark images, hashed once per benchmark identity and
  cached) within that many bits; no model, no GPU. Near-flat hashes (blank, plain gradients, a line of text on
  white: fewer than ``MIN_HASH_BITS`` bits set or unset) are skipped on both sides, as ``min_exact_words``
  skips short questions: they would match every plain image.
  ``near_threshold`` (in ``decontam_clip``): a CLIP cosine at or above it with the match stage's model. Our
  images' vectors are the match stage's own where its coverage pass saved them
  (``NN_match/coverage/embeddings.npz``); only the others are embedded here. The cosines are taken a block at
  a time with a running best match, never as one [ours x theirs] matrix.
  The detail names the benchmark image and every check that fired, e.g. ``near copy (phash: 3 of 64 dHash bits
  from MMBench: 0042.png; clip: cosine 0.981 with MMBench: 0042.png)``; ``fired_checks`` reads it back, so an
  audit can say how often each check agrees with a person.
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
HASHES_VERSION = "1"  # bump when image_hashes can change: part of the benchmark hashes' cache key
MIN_HASH_BITS = 8  # a dHash with fewer bits set (or unset) is near-flat: no evidence of a copy
PHASH_BLOCK = 1 << 22  # ours x theirs hash pairs compared at once (32 MB of XORs)


def image_hashes(path: Path, perceptual: bool = True) -> tuple[str, int | None] | None:
    """From one decode: SHA-256 of the decoded, upright RGB pixels and the size, and (``perceptual``) their
    dHash, the images stage's ``phash``; None (with a warning) when the file cannot be decoded: unreadable,
    truncated, or a decompression bomb (``open_rgb``'s pixel limit, PIL's bomb error)."""
    from PIL import Image

    from processors.image_validate import dhash
    from processors.imageio import open_rgb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            rgb = open_rgb(path)
        return (hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest(),
                dhash(rgb) if perceptual else None)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        logger.warning("decontamination: %s skipped, it cannot be decoded (%s: %s)", path, type(exc).__name__, exc)
        return None


def pixel_hash(path: Path) -> str | None:
    """``image_hashes``' pixel digest alone."""
    hashes = image_hashes(path, perceptual=False)
    return None if hashes is None else hashes[0]


def _threaded(function, items: Sequence) -> list:
    """``function`` of every item, on a few threads."""
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="decontam-hash") as pool:
        return list(pool.map(function, items))


def phash_matches(ours: dict[str, int], theirs: Sequence[int | None], distance: int) -> dict[str, tuple[int, int]]:
    """image_id -> (position in ``theirs``, bits apart) of its nearest benchmark dHash within ``distance`` bits
    (the first one on a tie). A hash with fewer than max(MIN_HASH_BITS, distance + 1) bits set, or unset, is
    skipped on either side: it is within reach of a flat image's 0 (or all ones) and would match every plain
    image. Compared exactly (XOR and popcount, a block at a time), not with ``loaders.images.dedup``'s band
    index: that one records every query as a new image, and at 6 to 16 bits its bands, 3 to 9 bits wide,
    would prune little."""
    import numpy as np

    floor = max(MIN_HASH_BITS, distance + 1)
    positions = [j for j, h in enumerate(theirs) if h is not None and floor <= h.bit_count() <= 64 - floor]
    ids = [i for i, h in ours.items() if floor <= h.bit_count() <= 64 - floor]
    logger.info("decontamination: dHash check over %d of %d images and %d of %d benchmark images (the others' "
                "hashes are near-flat)", len(ids), len(ours), len(positions), sum(h is not None for h in theirs))
    if not positions or not ids:
        return {}
    bench = np.array([theirs[j] for j in positions], dtype=np.uint64)
    mine = np.array([ours[i] for i in ids], dtype=np.uint64)
    step, out = max(1, PHASH_BLOCK // len(bench)), {}
    for start in range(0, len(mine), step):
        bits = np.bitwise_count(mine[start:start + step, None] ^ bench[None, :])
        best = bits.argmin(axis=1)
        near = bits[np.arange(len(best)), best]
        for k in np.flatnonzero(near <= distance):
            out[ids[start + k]] = (positions[int(best[k])], int(near[k]))
    return out


def fired_checks(detail: str) -> list[str]:
    """The image checks a ``benchmark_image`` detail records: ``["pixels"]``, or ``phash`` and/or ``clip``."""
    if detail.startswith("same pixels as"):
        return ["pixels"]
    return [check for check in ("phash", "clip") if re.search(rf"[(;] ?{check}: ", detail)]


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
    out: list = [_identity(b) for b in config.benchmark_images]
    for path in config.benchmark_questions:
        out.append({"questions": hashlib.sha256(Path(path).read_bytes()).hexdigest()})
    return out


def _identity(b) -> dict:
    if b.folder is not None:
        listing = hashlib.sha256()
        for p in _folder_images(Path(b.folder)):
            stat = p.stat()
            listing.update(f"{p.relative_to(b.folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return {"name": b.name, "folder": listing.hexdigest()}
    return {"name": b.name, "hub": b.hub, "config": b.config, "split": b.split, "columns": _columns(b),
            "revision": b.revision}


def benchmark_hashes(benchmark, files: list[Path], cache_dir: Path) -> list[tuple[str, int] | None]:
    """``image_hashes`` of a benchmark's files (``benchmark_files``), computed once per benchmark identity (the
    fingerprint's: a folder's listing of names, sizes and times; a Hub dataset's id, config, split, columns and
    revision) and kept under the cache; None for a file that cannot be decoded."""
    from processors.shared_files import write_atomic

    identity = {k: v for k, v in _identity(benchmark).items() if k != "name"}
    key = hashlib.sha256(json.dumps([HASHES_VERSION, identity], sort_keys=True).encode()).hexdigest()[:16]
    path, names = Path(cache_dir) / "benchmarks" / f"hashes-{key}.json", [p.name for p in files]
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["names"] == names:
            return [None if h is None else (h[0], int(h[1], 16)) for h in saved["hashes"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass  # not cached yet (or unreadable): hash now
    hashes = _threaded(image_hashes, files)
    text = json.dumps({"names": names, "hashes": [None if h is None else [h[0], f"{h[1]:016x}"] for h in hashes]})
    write_atomic(path, lambda handle: handle.write(text.encode()))
    return hashes


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
    bench, bench_hashes = [], []
    for b in config.benchmark_images:
        files = benchmark_files(b, cache)
        bench += [(b.name, p) for p in files]
        bench_hashes += benchmark_hashes(b, files, cache)
    phashes = _stage_phashes(ctx) if bench and config.near_hash_distance is not None else {}
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
        matched = _image_matches(images, bench, config, ctx, bench_hashes=bench_hashes, phashes={
            i: phashes[i] for i in images if i in phashes}) if bench else {}
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


def _stage_phashes(ctx) -> dict[str, int]:
    """The images stage's dHash of every image (its ``phash`` column, hex), so our images are not decoded for it."""
    from builder.outputs import column_values

    table = ctx.load_stage("images")
    if "phash" not in table.column_names:
        return {}
    return {i: int(h, 16) for i, h in zip(column_values(table, "image_id"), column_values(table, "phash")) if h}


def _image_matches(images: dict[str, Path], bench: list[tuple[str, Path]], config, ctx, *,
                   bench_hashes: list | None = None, phashes: dict[str, int] | None = None) -> dict[str, str]:
    """image_id -> why it is a benchmark image: the same pixels, else a near copy by dHash and/or CLIP (both
    recorded when both fire). ``bench_hashes``: ``image_hashes`` of ``bench`` (hashed here when not given);
    ``phashes``: our images' dHash from the images stage (taken from the decode here for the others)."""
    if bench_hashes is None:
        bench_hashes = _threaded(image_hashes, [path for _, path in bench])
    hashes: dict[str, str] = {}
    for (name, path), pair in zip(bench, bench_hashes):
        if pair is not None:
            hashes.setdefault(pair[0], f"{name}: {path.name}")
    unreadable = sum(pair is None for pair in bench_hashes)
    if unreadable:
        logger.warning("decontamination: %d of %d benchmark images could not be decoded and are skipped",
                       unreadable, len(bench))
    found, ids = {}, list(images)
    by_hash = config.near_hash_distance is not None
    phashes = dict(phashes or {})
    decoded = _threaded(lambda i: image_hashes(images[i], by_hash and i not in phashes), ids)
    for image_id, pair in zip(ids, decoded):
        if pair is not None and pair[0] in hashes:
            found[image_id] = f"same pixels as {hashes[pair[0]]}"
        elif pair is not None and pair[1] is not None:
            phashes[image_id] = pair[1]
    rest = [i for i in ids if i not in found]
    usable = [j for j, pair in enumerate(bench_hashes) if pair is not None]
    near: dict[str, list[str]] = {}
    if by_hash and rest and usable:
        theirs = [None if pair is None else pair[1] for pair in bench_hashes]
        ours = {i: phashes[i] for i in rest if i in phashes}
        for image_id, (j, bits) in phash_matches(ours, theirs, config.near_hash_distance).items():
            name, path = bench[j]
            near.setdefault(image_id, []).append(f"phash: {bits} of 64 dHash bits from {name}: {path.name}")
    if config.near_threshold is not None and rest and usable:
        from processors.quality.decontam_clip import clip_matches  # its model and GPU only when CLIP is on

        for image_id, (name, path, score) in clip_matches(rest, images, [bench[j] for j in usable], config,
                                                          ctx).items():
            near.setdefault(image_id, []).append(f"clip: cosine {score:.3f} with {name}: {path.name}")
    for image_id, parts in near.items():
        found[image_id] = f"near copy ({'; '.join(parts)})"
    fired = [check for detail in found.values() for check in fired_checks(detail)]
    logger.info("decontamination: %d benchmark images among %d: same pixels %d, phash %d, clip %d (both: %d)",
                len(found), len(ids), fired.count("pixels"), fired.count("phash"), fired.count("clip"),
                sum(len(parts) == 2 for parts in near.values()))
    return found


__all__ = ["QuestionIndex", "benchmark_hashes", "benchmark_identity", "contamination_check", "fired_checks",
           "image_hashes", "phash_matches", "pixel_hash"]
