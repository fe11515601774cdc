"""Reading a human audit's labels and the run they are about, and writing the figures into the run folder.

A labels file is what the audit page downloads: a JSON list (or an object whose ``labels`` is that list) of
``{"qa_id", "fits", "answer_correct", "needs_image", "audit_id"}``, each label true, false or null (not known);
other keys are ignored. Refused, with the file and row named (``AuditError``): a missing, unreadable or huge file, one that
is no regular file (a FIFO, ``/dev/zero``: refused before a byte is read), one that is not JSON (or nested too
deep to parse) or not a list, one with no labelled row at all (its figures would replace the run's with
dashes), the same file given twice as two people's, a row that is no object or has no ``qa_id``, a label that
is not true/false/null (``"yes"`` and ``1`` included), and the same ``qa_id`` twice in one file (an edited or
concatenated file: which one the person meant is not ours to guess). A row whose labels are all null is not
labelled and is left out.

The page writes its ``audit_id`` into each row: those labels are read against that draw's sample
(``<run>/audit/draws/<audit_id>/``, every draw kept), so drawing another sample meanwhile changes nothing; a
file whose rows name two pages, two files of two pages, or a page the run never drew are refused. Labels
without one are read against the latest draw (``<run>/audit/sample.jsonl``). A ``qa_id`` that is not in the
sample is left out with a warning; a file none of whose ``qa_id``s is in it is refused (the labels of another
run or another sample). Without an audit sample the labels are read as a simple random sample of the scored
questions within the two strata ``kept`` and ``dropped``, whose populations are the run's counts (rows of
``final`` and the rest of ``score``), and the figures say so.

``compute_audit`` writes ``<run>/audit/figures.json`` and a copy of each labels file as
``<run>/audit/labels-<sha256[:8]>.json``, so the figures (and the card) can be computed again from the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from typing import NamedTuple
from pathlib import Path

from loaders.images.paths import FileTooLargeError, NotRegularFileError, read_regular_file
from processors.quality.audit_figures import LABEL_FIELDS, AuditRow, Checks, audit_figures, inter_annotator
from processors.quality.audit_sample import AUDIT_DIR, MANIFEST_FILE, SAMPLE_FILE, draw_folder, drawn_from

logger = logging.getLogger(__name__)

FIGURES_FILE = "figures.json"
MAX_LABELS_BYTES = 50 * 1024 * 1024
AUDIT_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # a page's id names a folder of the run: no path in it
SRS_NOTE = ("no audit sample in this run (audit/sample.jsonl): the labels are taken as a simple random sample of "
            "the scored questions within kept and dropped, whose populations are the run's counts")


class AuditError(ValueError):
    """Labels, a sample or a run the audit cannot use; the message names the file and what is wrong."""


def _read_labels_file(path: Path) -> bytes:
    """The bytes of the labels file: a regular file of at most ``MAX_LABELS_BYTES``, read without blocking
    (``loaders.images.paths.read_regular_file``: a FIFO, ``/dev/zero`` or a symlink to one is refused, the read
    bounded even if the file grows), each refusal worded for the person who gave the path."""
    try:
        return read_regular_file(path, MAX_LABELS_BYTES)
    except FileNotFoundError:
        raise AuditError(f"no labels file at {path}") from None
    except NotRegularFileError:
        if path.is_dir():
            raise AuditError(f"labels file {path} is a folder; give the JSON file the audit page downloaded") from None
        raise AuditError(f"labels file {path} is not a regular file (a pipe, a device or a socket); give the JSON "
                         "file the audit page downloaded") from None
    except FileTooLargeError:
        raise AuditError(f"labels file {path} is over the {MAX_LABELS_BYTES // 2**20} MB a labels file can be; is "
                         "it the file the audit page downloaded?") from None
    except OSError as exc:
        raise AuditError(f"cannot read labels file {path}: {exc.strerror or exc}") from None


class LabelsFile(NamedTuple):
    labels: dict[str, dict]  # the labelled rows by qa_id (rows whose labels are all null left out)
    data: bytes  # the file as it was read
    rows: int  # how many rows it held
    audit_id: str | None  # the page they were made on (the page writes it into each row; None: made otherwise)


def read_labels(path: Path) -> LabelsFile:
    """One labels file, checked (see the module doc)."""
    path = Path(path)
    data = _read_labels_file(path)
    try:
        value = json.loads(data)  # bytes: UTF-8 with or without a BOM, UTF-16 and UTF-32 (Notepad, PowerShell)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditError(f"labels file {path} is not JSON ({exc})") from None
    except RecursionError:  # '[[[[...' nested deeper than the decoder's stack: no labels file looks like that
        raise AuditError(f"labels file {path} is JSON nested too deep to be a list of labels") from None
    if isinstance(value, dict) and isinstance(value.get("labels"), list):
        value = value["labels"]
    if not isinstance(value, list):
        raise AuditError(f"labels file {path} holds a JSON {type(value).__name__}, not a list of labels "
                         '[{"qa_id": ..., "fits": ..., "answer_correct": ..., "needs_image": ...}]')
    labels: dict[str, dict] = {}
    seen: dict[str, int] = {}
    drawn_on: set[str] = set()
    for index, row in enumerate(value):
        where = f"labels file {path}, row {index}"
        if not isinstance(row, dict):
            raise AuditError(f"{where} is a JSON {type(row).__name__}, not an object")
        qa_id = row.get("qa_id")
        if not isinstance(qa_id, str) or not qa_id:
            raise AuditError(f"{where} has no qa_id (a non-empty string)")
        if qa_id in seen:
            raise AuditError(f"{where}: qa_id {qa_id} is labelled twice (rows {seen[qa_id]} and {index}); keep "
                             "the one you mean and remove the other")
        seen[qa_id] = index
        audit_id = row.get("audit_id")
        if audit_id is not None:
            if not (isinstance(audit_id, str) and AUDIT_ID.fullmatch(audit_id)):
                raise AuditError(f"{where} (qa_id {qa_id}): audit_id {json.dumps(audit_id)[:40]} is not an audit "
                                 "page's id")
            drawn_on.add(audit_id)
        for name in LABEL_FIELDS:
            if row.get(name) is not None and not isinstance(row[name], bool):
                raise AuditError(f"{where} (qa_id {qa_id}): {name} must be true, false or null, "
                                 f"not {json.dumps(row[name])[:40]}")
        if any(row.get(name) is not None for name in LABEL_FIELDS):
            labels[qa_id] = {name: row.get(name) for name in LABEL_FIELDS}
    if len(drawn_on) > 1:
        raise AuditError(f"labels file {path} mixes labels of {len(drawn_on)} audit pages "
                         f"({', '.join(sorted(drawn_on))}): give each page's labels as a file of its own")
    return LabelsFile(labels, data, len(value), next(iter(drawn_on), None))


def _draw(run_dir: Path, audit_id: str | None, named_by: str) -> Path | None:
    """The folder holding the sample ``audit_id`` names (None: the latest draw); None when the run has none."""
    latest = Path(run_dir) / AUDIT_DIR
    if audit_id is None:
        return latest if (latest / SAMPLE_FILE).exists() else None
    kept = draw_folder(run_dir, audit_id)
    if (kept / SAMPLE_FILE).exists():
        return kept
    try:  # drawn before the run kept every draw: the latest may still be it
        if json.loads((latest / MANIFEST_FILE).read_text(encoding="utf-8")).get("audit_id") == audit_id:
            return latest
    except (OSError, ValueError, AttributeError):
        pass
    raise AuditError(f"{named_by} was made on audit page {audit_id}, which run {run_dir} did not draw (or no longer "
                     "has): give the labels to the run whose page they came from, or draw the page again with "
                     "the same --sample, --stratify and --seed (the same sample while the score and final stages "
                     "are unchanged)")


def read_sample(run_dir: Path, audit_id: str | None = None, named_by: str = "the labels file"
                ) -> tuple[dict[str, dict], dict] | None:
    """The run's audit sample by ``qa_id`` (``stratum``, ``kept``, ``stratum_population``) and its manifest
    (``audit.json``; {} when absent): of the draw ``audit_id`` (an AuditError naming ``named_by`` when the run
    has no such draw), else of the latest; None when the run has no audit sample."""
    folder = _draw(Path(run_dir), audit_id, named_by)
    if folder is None:
        return None
    path = folder / SAMPLE_FILE
    sample = {}
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("qa_id"), str) and isinstance(row.get("stratum"), str)
                    and isinstance(row.get("kept"), bool) and isinstance(row.get("stratum_population"), int)):
                raise AuditError(f"{path}, line {number}: not a sampled row (qa_id, stratum, kept, "
                                 "stratum_population); draw the sample again with taskgalaxy audit RUN --sample N")
            sample[row["qa_id"]] = row
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")) \
            if (folder / MANIFEST_FILE).exists() else {}
    except (OSError, ValueError) as exc:
        if isinstance(exc, AuditError):
            raise
        raise AuditError(f"cannot read the run's audit sample in {folder}: {exc}") from None
    return sample, manifest if isinstance(manifest, dict) else {}


def read_run(run_dir: Path, wanted: set[str]) -> tuple[dict[str, dict], set[str], Checks, int]:
    """For the ``wanted`` qa_ids that were scored: their ``votes`` and ``p_yes``; the kept qa_ids (rows of
    ``final``); the referees and checks (from the config the final stage ran with, in its ``state.json``);
    the number of scored questions."""
    from builder.outputs import StageNotReadyError, column_values, load_stage_output, stage_state

    try:
        score = load_stage_output(Path(run_dir), "score")
        kept = set(column_values(load_stage_output(Path(run_dir), "final"), "qa_id"))
        final = stage_state(Path(run_dir), "final")[1].get("config") or {}
    except StageNotReadyError as exc:
        raise AuditError(f"an audit needs the run's score and final stages: {exc}") from None
    ids = column_values(score, "qa_id")
    chosen = score.select([i for i, qa_id in enumerate(ids) if qa_id in wanted])
    votes, p_yes = column_values(chosen, "votes"), column_values(chosen, "p_yes")
    scored = {qa_id: {"votes": v or {}, "p_yes": p or {}}
              for qa_id, v, p in zip(column_values(chosen, "qa_id"), votes, p_yes)}
    referees = list(score.features["votes"])
    answer, blind = final.get("answer_referees") or [], final.get("blind_referees") or []
    checks = Checks(counting=[n for n in referees if n not in set(answer) | set(blind)],
                    answer_referees=[n for n in answer if n in referees],
                    blind_referees=[n for n in blind if n in referees],
                    blind_f1_threshold=final.get("blind_f1_threshold", 0.5))  # 0.5: FinalConfig's default
    return scored, kept, checks, len(ids)


def _rows(labels: dict[str, dict], strata: dict[str, tuple[str, bool]], scored: dict[str, dict]) -> list[AuditRow]:
    return [AuditRow(qa_id=q, stratum=strata[q][0], kept=strata[q][1], **labels[q],
                     votes=scored.get(q, {}).get("votes", {}), p_yes=scored.get(q, {}).get("p_yes", {}))
            for q in sorted(labels) if q in strata]


def _design(drawn, scored: dict, kept: set[str], scored_count: int) -> tuple[dict, dict, dict, list[str]]:
    """Each usable qa_id's (stratum, kept), each stratum's population, the sample's manifest and warnings: from
    the audit sample, or (none drawn) the kept/dropped split of the scored questions."""
    if not drawn:
        strata = {q: ("kept" if q in kept else "dropped", q in kept) for q in scored}
        return strata, {"kept": len(kept), "dropped": scored_count - len(kept)}, {}, []
    sample, manifest = drawn
    strata = {q: (row["stratum"], row["kept"]) for q, row in sample.items()}
    # Every stratum of the run, even one the sample left empty (listed, with no labelled row to speak for it)
    populations = {name: s["population"] for name, s in (manifest.get("strata") or {}).items()
                   if isinstance(s, dict) and isinstance(s.get("population"), int)}
    populations |= {row["stratum"]: row["stratum_population"] for row in sample.values()}
    changed = sum(row["kept"] != (q in kept) for q, row in sample.items() if q in scored)
    warnings = [f"{changed} sampled questions are kept or dropped differently in the run's final stage now than "
                "when the sample was drawn; the figures use the sample's"] if changed else []
    return strata, populations, manifest, warnings


def compute_audit(run_dir: Path, label_paths: Sequence[Path]) -> dict:
    """The figures of the first labels file (the second, if given, only for the agreement between the two
    people), written to ``<run>/audit/figures.json`` with the labels files copied beside it."""
    from builder.runfolder import atomic_write_bytes, atomic_write_json

    run_dir = Path(run_dir)
    if not 1 <= len(label_paths) <= 2:
        raise AuditError("give one labels file, or two (two people's labels of the same sample)")
    files = [read_labels(p) for p in label_paths]
    if len(files) == 2 and Path(label_paths[0]).resolve() == Path(label_paths[1]).resolve():
        raise AuditError(f"{label_paths[0]} is given twice: the agreement between two people needs each person's "
                         "own labels file")
    pages = {f.audit_id: path for path, f in zip(label_paths, files) if f.audit_id is not None}
    if len(pages) > 1:
        raise AuditError(f"{label_paths[0]} and {label_paths[1]} were made on two different audit pages "
                         f"({', '.join(sorted(pages))}): the agreement between two people needs labels of one sample")
    audit_id, named_by = next(iter(pages.items()), (None, None))
    drawn = read_sample(run_dir, audit_id, f"labels file {named_by}")
    wanted = set(drawn[0]) if drawn else {q for f in files for q in f.labels}
    scored, kept, checks, scored_count = read_run(run_dir, wanted)
    strata, populations, manifest, warnings = _design(drawn, scored, kept, scored_count)
    described = []
    for path, (labels, data, held, _) in zip(label_paths, files):
        unknown = sorted(set(labels) - set(strata))
        if not labels:  # figures of nothing would replace the run's figures (and its card section) with dashes
            raise AuditError(f"{path} labels no sample ({held} rows, none with a label): label some on the audit "
                             "page and download the labels again")
        if len(unknown) == len(labels):
            raise AuditError(f"none of the {len(labels)} labelled qa_ids of {path} is in this run's audit sample: "
                             "labels of another run or of another sample?")
        if unknown:
            warnings.append(f"{path}: {len(unknown)} labelled qa_ids are not in this run's audit sample and were "
                            f"left out (e.g. {unknown[0]})")
        described.append({"file": str(path), "copy": f"{AUDIT_DIR}/labels-{hashlib.sha256(data).hexdigest()[:8]}.json",
                          "rows": held, "labelled": len(labels) - len(unknown), "unknown_qa_ids": len(unknown)})
    if len(files) == 2 and files[0].data == files[1].data:
        warnings.append(f"{label_paths[0]} and {label_paths[1]} are byte for byte the same file: two people "
                        "rarely agree on every label; is one a copy of the other?")
    stages = drawn_from(run_dir)
    if isinstance(manifest.get("stages"), dict) and manifest["stages"] != stages:
        # the strata and their populations are the earlier stages': figures for the run as it was, so the card
        # leaves them out (``stages`` recorded as the draw's), the command line shows them with this warning
        warnings.append(f"the sample (audit {manifest.get('audit_id')}) was drawn before the run's score or final "
                        "stage changed: these figures are of the run as it was then; draw a new sample (taskgalaxy "
                        "audit RUN --sample N --out DIR) and label it to audit the run as it is")
        stages = manifest["stages"]
    kept_population = len(kept)  # what a user trains on: the run's kept samples now
    figures = {
        "audit_id": manifest.get("audit_id"), "stratify": manifest.get("stratify"),
        "design": "stratified" if drawn else "simple_random",
        **({} if drawn else {"note": SRS_NOTE}),
        "labels_files": described, "warnings": warnings,
        "population": {"scored": scored_count, "kept": kept_population},
        "stages": stages,  # the card leaves the figures out once these stages change
        **audit_figures(_rows(files[0].labels, strata, scored), populations, checks, kept_population=kept_population),
        "inter_annotator": inter_annotator(*[{q: v for q, v in f.labels.items() if q in strata} for f in files])
        if len(files) == 2 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    json.dumps(figures, allow_nan=False)  # a NaN would be a bug of ours: fail here, not in a reader
    for entry, file in zip(described, files):
        atomic_write_bytes(run_dir / entry["copy"], file.data)
    atomic_write_json(run_dir / AUDIT_DIR / FIGURES_FILE, figures)
    for warning in warnings:
        logger.warning("%s", warning)
    return figures
