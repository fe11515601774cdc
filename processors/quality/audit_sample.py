"""The sample half of ``taskgalaxy audit``: which scored questions a person checks, and the record of how they
were drawn, so the labels can be reweighted to the whole run later (``audit --labels``).

The population is every question the score stage holds (kept *and* dropped by ``final``: recall needs both).
Strata are (kept | dropped) × one key: the question's first-level ``category``, its image's ``source``, or its
counting ``votes`` total. Allocation of ``n`` (largest-remainder rounding throughout, so it always adds up):

1. **Sides.** Each side gets its share of ``n`` in proportion to its size, but at least ``ceil(n / 3)`` when it
   has that many questions (and all of them when it has fewer); what one side cannot fill goes to the other.
   A third for the dropped side keeps recall measurable when the referees keep most questions; a third for the
   kept side keeps the headline figure (accuracy of kept samples) measurable when they drop most.
2. **Strata within a side.** One question per stratum first when the side's share allows (a category nobody
   looked at has no figure), then the rest in proportion to what each stratum has left; when the share is
   smaller than the number of strata, the largest strata get one each.
3. **Questions within a stratum.** Ordered by ``sha256(f"{seed}:{qa_id}")`` and taken from the front: the draw
   depends on (run, n, stratify, seed) only, never on row or shard order.

The sample comes back in that same hash order across strata, so a person labelling it in order sees kept and
dropped questions mixed, never grouped by what the referees decided. ``n`` at least the population: all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from builder.outputs import (StageNotReadyError, column_values, load_stage_failures, load_stage_output,
                             stage_state)
from loaders.images.paths import PathEscapeError, load_roots, resolve_image_path
from loaders.taxonomy.names import SEPARATOR

logger = logging.getLogger(__name__)

STRATIFY = ("category", "source", "votes")
AUDIT_DIR = "audit"  # <run>/audit/ holds the latest sample manifest
SAMPLE_FILE = "sample.jsonl"
MANIFEST_FILE = "audit.json"
DRAWS_DIR = "draws"  # <run>/audit/draws/<audit_id>/: every draw's sample and manifest
UNKNOWN = "unknown"


def _require(run_dir: Path, name: str):
    """A finished stage's output, or a ValueError that says what to run first."""
    try:
        return load_stage_output(run_dir, name)
    except StageNotReadyError as exc:
        raise ValueError(f"an audit samples the scored questions of a finished run: {exc}") from exc


def _counting(run_dir: Path) -> set[str]:
    """The final stage's answer and blind checks: their votes are no part of the protocol's total."""
    config = stage_state(run_dir, "final")[1].get("config") or {}
    return set(config.get("answer_referees") or ()) | set(config.get("blind_referees") or ())


def _images(run_dir: Path) -> dict[str, tuple[str | None, str | None]]:
    """``image_id -> (source, stored path)``; empty when the images stage is gone (then sources are unknown)."""
    try:
        images = load_stage_output(run_dir, "images")
    except StageNotReadyError as exc:
        logger.warning("audit: no images stage (%s): sources unknown, no pictures", exc)
        return {}
    return dict(zip(column_values(images, "image_id"),
                    zip(column_values(images, "source"), column_values(images, "path"))))


def _resolver(run_dir: Path):
    try:
        roots = load_roots(run_dir)
    except FileNotFoundError:
        roots = {}

    done: dict[str, str | None] = {}  # an image carries several questions: one realpath walk per file

    def resolve(stored: str | None) -> str | None:
        if stored is None:
            return None
        if stored not in done:
            try:
                done[stored] = str(resolve_image_path(run_dir, stored, roots))
            except PathEscapeError as exc:
                logger.warning("audit: image %s not resolved (%s)", stored, exc)
                done[stored] = None
        return done[stored]

    return resolve


def population(run_dir: Path) -> list[dict]:
    """Every scored question of the run, one dict per ``qa_id`` in score order: ``qa_id, image_id, task_type,
    question, answer, kept`` (in the final stage's output), ``category`` (first ``~`` segment of the task
    type), ``source`` (of its image; ``"unknown"`` when the images stage has none), ``votes_total`` (the
    counting referees' votes: the final stage's answer/blind checks left out, a vote not asked counts 0),
    ``votes`` (every referee's vote, None = not asked or missing), ``drop_reason`` (the final stage's failure
    reason of a dropped question, None when kept) and ``image`` (the file, resolved inside its image root;
    None when it cannot be). ValueError when the score or final stage has not finished."""
    rows, resolve = _unresolved_population(run_dir)
    _add_texts(run_dir, rows)
    for row in rows:
        row.pop("score_row")
        row["image"] = resolve(row.pop("stored_path"))
    return rows


def _unresolved_population(run_dir: Path) -> tuple[list[dict], Callable[[str | None], str | None]]:
    """``population``'s rows without their question and answer (``_add_texts`` reads them for the rows that
    need them: at the paper's 1.75 M questions the texts are most of the memory), with the score row's index
    (``score_row``) and the image's stored path (``stored_path``) in place of ``image``, and the resolver:
    resolving is a realpath walk per image file, which ``write_audit`` does for the sample only (200k rows:
    seconds of ``lstat`` for pictures nobody shows)."""
    run_dir = Path(run_dir)
    score, final = _require(run_dir, "score"), _require(run_dir, "final")
    kept = set(column_values(final, "qa_id"))
    failures = load_stage_failures(run_dir, "final")
    reasons = dict(zip(column_values(failures, "key"), column_values(failures, "reason")))
    checks, images, resolve = _counting(run_dir), _images(run_dir), _resolver(run_dir)
    columns = {c: column_values(score, c) for c in ("qa_id", "image_id", "task_type", "votes")}
    rows = []
    for i, qa_id in enumerate(columns["qa_id"]):
        votes = columns["votes"][i] or {}
        source, stored = images.get(columns["image_id"][i], (None, None))
        rows.append({
            "qa_id": qa_id, "image_id": columns["image_id"][i], "task_type": columns["task_type"][i],
            "kept": qa_id in kept, "category": columns["task_type"][i].split(SEPARATOR)[0],
            "source": source or UNKNOWN,
            "votes_total": sum(v for name, v in votes.items() if name not in checks and v is not None),
            "votes": votes, "drop_reason": None if qa_id in kept else reasons.get(qa_id),
            "stored_path": stored, "score_row": i,
        })
    return rows, resolve


def _add_texts(run_dir: Path, rows: list[dict]) -> None:
    """Each row's ``question`` and ``answer``, read from the score stage for these rows only."""
    picked = _require(Path(run_dir), "score").select([row["score_row"] for row in rows])
    for row, question, answer in zip(rows, column_values(picked, "question"), column_values(picked, "answer")):
        row["question"], row["answer"] = question, answer


def stratum_of(row: dict, stratify: str) -> str:
    """``kept/<value>`` or ``dropped/<value>``: the side has no ``/``, so the first one splits it off again."""
    value = {"category": row["category"], "source": row["source"], "votes": str(row["votes_total"])}[stratify]
    return f"{'kept' if row['kept'] else 'dropped'}/{value}"


def _hash_key(seed: int, qa_id: str) -> str:
    return hashlib.sha256(f"{seed}:{qa_id}".encode()).hexdigest()


def _largest_remainder(weights: dict[str, int], total: int) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (each share at most its weight when total <= sum); ties in
    the remainders go to the larger weight, then to the name, so the split never depends on dict order."""
    whole = sum(weights.values())
    if whole == 0 or total <= 0:
        return dict.fromkeys(weights, 0)
    quotas = {k: total * w / whole for k, w in weights.items()}
    shares = {k: math.floor(q) for k, q in quotas.items()}
    order = sorted(weights, key=lambda k: (-(quotas[k] - shares[k]), -weights[k], k))
    for k in order[:total - sum(shares.values())]:
        shares[k] += 1
    return shares


def _side_sizes(kept: int, dropped: int, n: int) -> tuple[int, int]:
    """(kept, dropped) shares of ``n`` (rule 1 of the module docstring); n < kept + dropped."""
    third = math.ceil(n / 3)
    proportional = _largest_remainder({"kept": kept, "dropped": dropped}, n)
    d = max(proportional["dropped"], min(dropped, third))
    d = min(d, n - min(kept, third), dropped)  # the kept side's third comes first when both want more
    k = min(kept, n - d)
    return k, min(dropped, n - k)


def _within_side(sizes: dict[str, int], m: int) -> dict[str, int]:
    """Rule 2 of the module docstring: one per stratum when ``m`` allows, the rest in proportion to what is left."""
    if m < len(sizes):  # not one each: the largest strata get one
        chosen = sorted(sizes, key=lambda s: (-sizes[s], s))[:m]
        return {s: int(s in chosen) for s in sizes}
    rest = _largest_remainder({s: size - 1 for s, size in sizes.items()}, m - len(sizes))
    return {s: 1 + rest[s] for s in sizes}


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many questions each stratum (``kept/...``, ``dropped/...``) gives to a sample of ``n``."""
    if n >= sum(sizes.values()):
        return dict(sizes)
    sides = {side: {s: size for s, size in sizes.items() if s.startswith(side + "/")} for side in ("kept", "dropped")}
    k, d = _side_sizes(sum(sides["kept"].values()), sum(sides["dropped"].values()), n)
    return {**_within_side(sides["kept"], k), **_within_side(sides["dropped"], d)}


def draw_sample(rows: list[dict], n: int, stratify: str = "category", seed: int = 0) -> list[dict]:
    """Deterministic stratified sample of ``rows`` (``population``'s dicts): ``{qa_id, stratum, kept,
    stratum_population, stratum_sampled}`` in ``sha256(seed:qa_id)`` order (see the module docstring)."""
    if stratify not in STRATIFY:
        raise ValueError(f"stratify must be one of {', '.join(STRATIFY)}, not {stratify!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the sample size must be a whole number of at least 1, not {n!r}")
    strata: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        strata[stratum_of(row, stratify)].append(row)
    sizes = {s: len(members) for s, members in strata.items()}
    if n >= len(rows):
        logger.info("audit: a sample of %d asked, the run has %d scored questions: all of them", n, len(rows))
    shares = allocate(sizes, n)
    sample = []
    for stratum, members in strata.items():
        for row in sorted(members, key=lambda r: _hash_key(seed, r["qa_id"]))[:shares[stratum]]:
            sample.append({"qa_id": row["qa_id"], "stratum": stratum, "kept": bool(row["kept"]),
                           "stratum_population": sizes[stratum], "stratum_sampled": shares[stratum]})
    return sorted(sample, key=lambda r: (_hash_key(seed, r["qa_id"]), r["qa_id"]))


def _audit_id(run_dir: Path, stratify: str, seed: int, n: int, sample: list[dict]) -> str:
    """Names the sample, not the moment: writing the same audit again keeps a person's saved progress (the
    page keys its browser storage by this id), while another run, key, seed or size gets a fresh one."""
    fingerprints = list(drawn_from(run_dir).values())
    identity = json.dumps([fingerprints, stratify, seed, n, [r["qa_id"] for r in sample]])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def build_manifest(run_dir: Path, rows: list[dict], sample: list[dict], n: int, stratify: str, seed: int) -> dict:
    """The record ``audit --labels`` reweights from: every stratum of the run with its population, even one
    the sample left empty (its weight must still count)."""
    population_sizes = Counter(stratum_of(row, stratify) for row in rows)
    sampled = Counter(r["stratum"] for r in sample)
    return {
        "audit_id": _audit_id(run_dir, stratify, seed, n, sample), "seed": seed, "stratify": stratify, "n": n,
        "population": len(rows), "sampled": len(sample), "whole_population": len(sample) == len(rows),
        "strata": {s: {"population": size, "sampled": sampled.get(s, 0), "kept": s.startswith("kept/")}
                   for s, size in sorted(population_sizes.items())},
        "stages": drawn_from(run_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def drawn_from(run_dir: Path) -> dict[str, str | None]:
    """The fingerprints of the stages an audit rests on: figures computed under others are out of date."""
    return {name: stage_state(Path(run_dir), name)[1].get("fingerprint") for name in ("score", "final")}


def sample_jsonl(sample: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in sample).encode("utf-8")


PAGE_MARK = b'<meta name="taskgalaxy-audit"'  # what every audit page holds near its top (audit_page_html)


def check_out_dir(run_dir: Path, out_dir: Path) -> None:
    """ValueError unless ``out_dir`` can take the page: a folder (or nothing yet) outside the run folder whose
    ``index.html``, if any, is an earlier audit page (drawing again into the same folder replaces it). A user's
    own ``index.html`` is never replaced, and a run folder (the stages own it) never gets the page."""
    from processors.quality.audit_page import PAGE_FILE

    out_dir, run_dir = Path(out_dir), Path(run_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder: give a folder for the labelling page")
    out_real, run_real = out_dir.resolve(), run_dir.resolve()
    if out_real == run_real or run_real in out_real.parents:
        raise ValueError(f"--out {out_dir} is inside the run folder {run_dir}, which the stages own: write the page "
                         f"outside it (the run keeps its own copy of the sample in {run_dir / AUDIT_DIR})")
    page = out_dir / PAGE_FILE
    if page.is_symlink() or (page.exists() and not page.is_file()):
        raise ValueError(f"{page} is a link or not a file: choose an empty folder for the labelling page")
    if page.exists():
        with open(page, "rb") as handle:
            head = handle.read(4096)
        if PAGE_MARK not in head:
            raise ValueError(f"{page} exists and is not a TaskGalaxy audit page: not replacing it; choose an empty "
                             "folder (or remove the file) for the labelling page")
    elif (out_dir / SAMPLE_FILE).exists():
        raise ValueError(f"{out_dir / SAMPLE_FILE} exists beside no audit page: not replacing it; choose an empty "
                         "folder for the labelling page")


def draw_folder(run_dir: Path, audit_id: str) -> Path:
    """Where the run keeps the sample and manifest of draw ``audit_id`` (every draw, so labels made on an
    earlier page are still read against the sample they were made on)."""
    return Path(run_dir) / AUDIT_DIR / DRAWS_DIR / audit_id


def write_audit(run_dir: Path, n: int, out_dir: Path, stratify: str = "category", seed: int = 0) -> dict:
    """Write ``out_dir/index.html`` (the labelling page), ``out_dir/sample.jsonl``, and the same sample plus
    its manifest (``audit.json``: ``audit_id, seed, stratify, n, strata: {stratum: {population, sampled,
    kept}}, created``, ``population``/``sampled``/``whole_population``, ``stages`` (the score and final
    fingerprints it was drawn from) and ``no_picture``: the sampled qa_ids the page shows without their image)
    into ``run_dir/audit/`` (the latest draw, read by labels that do not name theirs) and
    ``run_dir/audit/draws/<audit_id>/`` (kept, for labels that do). ``out_dir`` must pass ``check_out_dir``
    (checked before anything is written); the run's copy of the sample is written before the page, so a run
    folder that cannot take it leaves no page to label. Returns the manifest."""
    from processors.quality.audit_page import write_audit_page
    from processors.shared_files import write_atomic

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_out_dir(run_dir, out_dir)
    rows, resolve = _unresolved_population(run_dir)
    sample = draw_sample(rows, n, stratify, seed)
    manifest = build_manifest(run_dir, rows, sample, n, stratify, seed)
    if manifest["whole_population"]:
        logger.warning("audit: %d asked, the run has %d scored questions: the sample is all of them", n, len(rows))
    by_id = {row["qa_id"]: row for row in rows}
    picked = [by_id[r["qa_id"]] for r in sample]
    _add_texts(run_dir, picked)
    shown = [{k: v for k, v in row.items() if k not in ("stored_path", "score_row")}
             | {"image": resolve(row["stored_path"])} for row in picked]
    lines = sample_jsonl(sample)
    # The run's copies are the ones `audit --labels` reads (the page's folder may be sent to a person). The draw's
    # sample first, so that a run folder that cannot be written fails before there is a page whose labels nothing
    # could read; the latest draw's pair (audit/) only once the page is written, so a page that fails to write
    # (a full disk) leaves the latest sample and its manifest as they were, one draw's both.
    drawn = draw_folder(run_dir, manifest["audit_id"])
    write_atomic(drawn / SAMPLE_FILE, lambda handle: handle.write(lines))
    no_picture: list[str] = []
    write_audit_page(out_dir, shown, manifest["audit_id"], run_dir, no_picture=no_picture)
    manifest["no_picture"] = no_picture
    if no_picture:
        logger.warning("audit: %d of %d sampled questions have no picture on the page (image missing or "
                       "unreadable), e.g. %s", len(no_picture), len(sample), no_picture[0])
    write_atomic(out_dir / SAMPLE_FILE, lambda handle: handle.write(lines))
    text = (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomic(drawn / MANIFEST_FILE, lambda handle: handle.write(text))
    write_atomic(run_dir / AUDIT_DIR / SAMPLE_FILE, lambda handle: handle.write(lines))
    write_atomic(run_dir / AUDIT_DIR / MANIFEST_FILE, lambda handle: handle.write(text))
    logger.info("audit %s: %d of %d scored questions in %s", manifest["audit_id"], len(sample), len(rows), out_dir)
    return manifest
