"""A human audit's figures as text: the table ``taskgalaxy audit RUN --labels FILE`` prints, and the dataset
card's "Human audit" section (Markdown; nothing when the run has no ``audit/figures.json``)."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _pct(value) -> str:
    return "—" if value is None else f"{value:.1%}"


def _num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _share(figure: dict) -> str:
    if figure.get("share") is None:
        return f"— ({figure.get('reason', 'no data')})"
    if figure.get("exact"):
        return f"{_pct(figure['share'])} (exact: every question it speaks for was labelled; n={figure['n']})"
    return (f"{_pct(figure['share'])} (95% CI {_pct(figure['low'])}–{_pct(figure['high'])}; "
            f"n={figure['n']}, n_eff={figure['n_eff']:g})")


def _wrong(projected: dict) -> str:
    if projected.get("estimate") is None:
        return f"— of {projected['kept_population']:,} kept samples"
    if projected.get("exact"):
        return f"{projected['estimate']:,} of {projected['kept_population']:,} kept samples (exact: counted)"
    return (f"{projected['estimate']:,} of {projected['kept_population']:,} kept samples (95% CI "
            f"{projected['low']:,}–{projected['high']:,})")


def _coverage(figures: dict) -> str | None:
    """A sentence when a table speaks for fewer questions than the run scored (strata with no labelled sample
    there: their questions are in no table; a referee with no vote on a stratum's rows), else None."""
    covers = [t.get("population_covered") for _, _, t in _table_rows(figures)]
    covered = min((c for c in covers if c is not None), default=None)
    strata = figures.get("strata") or {}
    scored = (sum(s.get("population", 0) for s in strata.values()) if strata
              else (figures.get("population") or {}).get("scored"))
    if covered is None or not scored or covered >= scored:
        return None
    return (f"The tables speak for as few as {covered} of the run's {scored} scored questions: a stratum with no "
            "labelled sample (or none its referee voted on) is left out of a table.")


def _table_rows(figures: dict) -> list[tuple[str, str, dict]]:
    """(who, compared with, table) for every referee, the vote, the answer and blind checks."""
    rows = [(name, "good", t["good"]) for name, t in figures.get("referees", {}).items()]
    rows.append(("vote (kept)", "good", figures["vote"]["good"]))
    rows += [(f"answer check {name}", "answer correct", t) for name, t in figures.get("answer_check", {}).items()]
    rows += [(f"blind check {name}", "needs image", t) for name, t in figures.get("blind_check", {}).items()]
    return rows


def format_figures(figures: dict) -> str:
    """The figures as the readable table the CLI prints."""
    accuracy = figures["kept_accuracy"]
    lines = [f"audit of {figures['labelled']} labelled samples ({figures['labelled_kept']} kept, "
             f"{figures['labelled_dropped']} dropped; {figures['design']} design)"]
    if figures.get("note"):
        lines.append(f"note: {figures['note']}")
    lines += [
        f"kept samples, answer correct: {_share(accuracy['answer_correct'])}",
        f"kept samples, fit the image:  {_share(accuracy['fits'])}",
        f"kept samples, good (both):    {_share(accuracy['good'])}",
        f"answers left unknown: {accuracy['answer_unknown']} (out of the answer figures)",
        f"wrong answers in the run: {_wrong(accuracy['projected_wrong_answers'])}",
        "",
        f"{'who':<32} {'against':<15} {'n':>5} {'precision':>9} {'recall':>7} {'agree':>7} {'kappa':>6}  left out",
    ]
    for who, against, t in _table_rows(figures):
        left = t.get("left_out", {})
        lines.append(f"{who[:32]:<32} {against:<15} {t['n']:>5} {_pct(t['precision']):>9} {_pct(t['recall']):>7} "
                     f"{_pct(t['agreement']):>7} {_num(t['kappa']):>6}  "
                     f"no vote {left.get('no_vote', 0)}, unknown {left.get('person_unknown', 0)}")
    coverage = _coverage(figures)
    if coverage:
        lines.append(f"note: {coverage}")
    inter = figures.get("inter_annotator")
    if inter:
        lines += ["", f"between the two people ({inter['common']} samples both labelled):"]
        for name in ("fits", "answer_correct", "needs_image"):
            e = inter[name]
            lines.append(f"  {name:<15} n={e['n']:<5} agreement {_pct(e['agreement'])}  kappa {_num(e['kappa'])}"
                         + (f"  ({e['reason']})" if e.get("reason") else ""))
    lines += [f"warning: {w}" for w in figures.get("warnings", [])]
    return "\n".join(lines)


def read_figures(run_dir: Path) -> tuple[dict, bool] | None:
    """The run's audit figures (``<run>/audit/figures.json``) and whether they are out of date: the score or
    final stage changed since they were computed (figures written before they recorded the stages cannot tell,
    and are taken as they are). None without figures; ``OSError``/``ValueError`` for a damaged file."""
    import json

    from processors.quality.audit_labels import FIGURES_FILE
    from processors.quality.audit_sample import AUDIT_DIR, drawn_from

    path = Path(run_dir) / AUDIT_DIR / FIGURES_FILE
    if not path.exists():
        return None
    figures = json.loads(path.read_text(encoding="utf-8"))
    stages = figures.get("stages")
    return figures, isinstance(stages, dict) and stages != drawn_from(run_dir)


def card_section(run_dir: Path, md_text) -> list[str]:
    """The card's "Human audit" section from ``<run>/audit/figures.json``; [] when there is none. ``md_text``:
    the card's escaping of a text for one line of Markdown (a referee's name goes into a table cell)."""
    try:
        read = read_figures(run_dir)
        if read is None:
            return []
        figures, out_of_date = read
        if out_of_date:
            logger.warning("the card leaves out the human audit's figures: the run's score or final stage changed "
                           "since they were computed; run taskgalaxy audit %s --labels FILE again", run_dir)
            return ["## Human audit", "", f"The last human audit's figures ({md_text(str(figures.get('created')))}) "
                    "are of an earlier score or final stage of this run and are left out: run `taskgalaxy audit "
                    "RUN --labels FILE` again, or, if the sample itself was drawn before the change, draw and "
                    "label a new one (`taskgalaxy audit RUN --sample N --out DIR`).", ""]
        return _card_lines(figures, md_text)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file: the card goes on without it
        logger.warning("the card has no Human audit section: the run's audit/figures.json is unreadable (%s); run "
                       "taskgalaxy audit RUN --labels FILE again", exc)
        return []


def _card_lines(figures: dict, md_text) -> list[str]:
    accuracy = figures["kept_accuracy"]
    lines = [
        "## Human audit", "",
        f"A person labelled {figures['labelled']} samples drawn at random from the scored questions "
        f"({figures['labelled_kept']} kept, {figures['labelled_dropped']} dropped"
        + ("; stratified, each weighted by its stratum's size" if figures["design"] == "stratified"
           else "; read as a simple random sample within kept and dropped") + "). 95% intervals are Wilson's.",
        "",
        f"- Kept samples whose answer is correct: {_share(accuracy['answer_correct'])}",
        f"- Kept samples whose task type and question fit the image: {_share(accuracy['fits'])}",
        f"- Estimated wrong answers among the kept samples: {_wrong(accuracy['projected_wrong_answers'])}",
        "",
        "| referee | against the person's | n | precision | recall | agreement | Cohen's κ |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for who, against, t in _table_rows(figures):
        lines.append(f"| {md_text(who)} | {against} | {t['n']} | {_pct(t['precision'])} | {_pct(t['recall'])} | "
                     f"{_pct(t['agreement'])} | {_num(t['kappa'])} |")
    coverage = _coverage(figures)
    lines += [""] + ([coverage, ""] if coverage else [])
    lines += ["\"good\": the task type and question fit the image and the answer is correct."
              + (" A blind check says \"the question needs the image\" when it could not answer without it."
                 if figures.get("blind_check") else "")]
    inter = figures.get("inter_annotator")
    if inter:
        kappas = ", ".join(f"{name} {_num(inter[name]['kappa'])}" for name in ("fits", "answer_correct", "needs_image"))
        lines += ["", f"Two people labelled {inter['common']} samples both; Cohen's κ between them: {kappas}."]
    return lines + [""]


def status_lines(run_dir: Path) -> list[str]:
    """What ``taskgalaxy status`` says of the run's human audit: the figures (or that they are out of date),
    else the sample waiting for labels; [] without an audit."""
    import json

    from processors.quality.audit_sample import AUDIT_DIR, MANIFEST_FILE

    folder = Path(run_dir) / AUDIT_DIR
    try:
        read = read_figures(run_dir)
        if read is not None:
            figures, out_of_date = read
            if out_of_date:
                return [f"audit: the figures of {figures.get('created')} are for an earlier score or final stage; "
                        f"run taskgalaxy audit {run_dir} --labels FILE again (or draw a new sample, if it was "
                        "drawn before the change)"]
            accuracy = figures["kept_accuracy"]["answer_correct"]
            return [f"audit: kept answers correct {_share(accuracy)}, from {figures['labelled']} labelled samples "
                    f"({figures.get('created')})"]
        if (folder / MANIFEST_FILE).exists():
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
            return [f"audit: a sample of {manifest.get('sampled', manifest.get('n'))} drawn "
                    f"({manifest.get('created')}), no labels read yet: taskgalaxy audit {run_dir} --labels FILE"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"audit: {folder} is unreadable ({exc})"]
    return []


def sample_instructions(run_dir: Path, out: Path, manifest: dict) -> str:
    """What ``taskgalaxy audit RUN --sample N --out DIR`` prints: where the page is and how to label."""
    strata = manifest.get("strata") or {}
    sampled = sum(int(s.get("sampled", 0)) for s in strata.values()) if strata else manifest.get("n")
    missing = manifest.get("no_picture") or []
    warning = ([f"warning: {len(missing)} of {sampled} samples have no picture on the page (the image file is "
                f"missing or unreadable, e.g. the sample {missing[0]}); a person cannot judge whether they fit: "
                "restore the images and draw the page again"] if missing else [])
    return "\n".join(warning + [
        f"wrote the audit page of {sampled} samples ({len(strata)} strata, by {manifest.get('stratify')}, "
        f"seed {manifest.get('seed')}) to {Path(out) / 'index.html'}; the sample is listed in "
        f"{Path(run_dir) / 'audit' / 'sample.jsonl'}",
        f"1. open {Path(out) / 'index.html'} in a web browser (no server needed) and label every sample; to have "
        "someone else label, send them index.html alone: it holds every picture, and the sample.jsonl beside it "
        "says which samples the referees kept, which the person labelling should not see",
        "2. press \"download labels\" to save labels.json",
        f"3. taskgalaxy audit {run_dir} --labels labels.json   (a second person's file: add --labels theirs.json)",
    ])
