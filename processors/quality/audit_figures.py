"""The figures of a human audit: how many kept answers are right, and how well each referee agrees with a person.

Pure functions over labelled rows (``AuditRow``: the person's labels, the sample's stratum and the run's votes);
reading the labels and the run is ``processors.quality.audit_labels``, the table and the card section are
``processors.quality.audit_text``.

**Weights.** The sample is stratified (``kept``/``dropped`` × a key, ``processors.quality.audit_sample``), so a
labelled row stands for ``stratum_population / stratum_labelled`` questions of the run, where
``stratum_labelled`` counts the rows *that enter the figure at hand* (labelled, with the values it needs): an
unfinished labelling, or an answer the person left unknown, still gives an unbiased estimate per stratum, as
long as what is missing is missing at random within its stratum. A stratum without any usable row is left out
of that figure (``population_covered`` says how much of the run the figure speaks for).

**Interval.** Wilson's 95 % score interval at the effective sample size
``n_eff = 1 / sum_h W_h^2 (1 - f_h) / n_h`` (``W_h`` the stratum's share of the population covered, ``n_h`` its
rows entering the figure, ``f_h = n_h / N_h``): without the ``(1 - f_h)`` this is Kish's ``(sum w)^2 / sum w^2``
(the usual design-effect correction for a weighted share; with equal weights n_eff = n, the plain Wilson
interval); with it, the finite-population correction: a stratum labelled whole adds no uncertainty, and when
every stratum is (a census) the share is exact (``exact: true``, low = high = share). It is an approximation:
it takes the share as equal across strata when it weighs them, and is somewhat conservative when they differ a
lot.

**Good.** A sample is good for the person when it fits (task type and question suit the image) and its answer is
correct: false as soon as either is false, unknown when neither is false and one is unknown.

**Kappa.** Cohen's kappa of a referee (or the vote, or a check) against the person, from the weighted 2x2
table; ``kappa_unweighted`` from the labelled rows as they are (``processors.quality.agreement.cohen_kappa``).
Either is null, with a reason, when one side said the same thing every time: kappa is then 0 (or undefined) by
construction and says nothing about the referee.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from processors.quality.agreement import cohen_kappa

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
LABEL_FIELDS = ("fits", "answer_correct", "needs_image")
DIGITS = 4


@dataclass(frozen=True)
class AuditRow:
    """One labelled sample: the person's labels (None where left unknown), its stratum and the run's verdicts."""

    qa_id: str
    stratum: str
    kept: bool  # the final stage kept it (the vote and every check)
    fits: bool | None
    answer_correct: bool | None
    needs_image: bool | None
    votes: dict[str, int | None] = field(default_factory=dict)  # 05_score's votes (None: missing / not asked)
    p_yes: dict[str, float | None] = field(default_factory=dict)

    @property
    def good(self) -> bool | None:
        if self.fits is False or self.answer_correct is False:
            return False
        if self.fits is None or self.answer_correct is None:
            return None
        return True


@dataclass(frozen=True)
class Checks:
    """What the final stage checked, from its config: the referees that count toward the threshold, and the
    answer and blind (text-only) referees with the agreement at which a blind answer counts as right."""

    counting: Sequence[str]
    answer_referees: Sequence[str] = ()
    blind_referees: Sequence[str] = ()
    blind_f1_threshold: float = 0.5


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def wilson(share: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a share observed over ``n`` (possibly effective, fractional) trials."""
    if n <= 0:
        raise ValueError("the Wilson interval needs n > 0")
    share = min(max(share, 0.0), 1.0)
    denominator = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def kish_n_eff(weights: Sequence[float]) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` (0 for no weights)."""
    squares = sum(w * w for w in weights)
    return sum(weights) ** 2 / squares if squares else 0.0


def effective_n(strata: Sequence[str], populations: dict[str, int]) -> float:
    """``1 / sum_h W_h^2 (1 - f_h) / n_h`` over the strata of the rows given (see the module's doc): Kish's
    effective n with each stratum's finite-population correction; ``math.inf`` when every stratum was labelled
    whole (a census of them), ``len(strata)`` when they cover no population at all."""
    counts = Counter(strata)
    covered = sum(populations[s] for s in counts)
    if covered <= 0:
        return float(len(strata))
    total = 0.0
    for stratum, n in counts.items():
        size = populations[stratum]
        share, fraction = size / covered, min(1.0, n / size) if size > 0 else 1.0
        total += share * share * (1 - fraction) / n
    return math.inf if total <= 0 else 1 / total


def stratum_weights(strata: Sequence[str], populations: dict[str, int]) -> list[float]:
    """Each row's weight: its stratum's population over the rows of that stratum given here."""
    counts = Counter(strata)
    return [populations[s] / counts[s] for s in strata]


def weighted_share(values: Sequence[bool], strata: Sequence[str], populations: dict[str, int]) -> dict:
    """The estimated share of true ``values`` in the strata's populations, with its Wilson 95 % interval over
    the Kish effective n. ``share`` is null (with ``reason``) when no row is given."""
    covered = sum(populations[s] for s in set(strata))
    if not values:
        return {"share": None, "low": None, "high": None, "n": 0, "n_eff": 0.0, "population_covered": 0,
                "reason": "no labelled sample enters this figure"}
    weights = stratum_weights(strata, populations)
    total = sum(weights)
    share = sum(w for w, v in zip(weights, values) if v) / total if total else 0.0
    n_eff = effective_n(strata, populations)
    if math.isinf(n_eff):  # every question of these strata labelled: the share is counted, not estimated
        return {"share": _round(share), "low": _round(share), "high": _round(share), "n": len(values),
                "n_eff": float(len(values)), "exact": True, "population_covered": covered}
    low, high = wilson(share, n_eff)
    return {"share": _round(share), "low": _round(low), "high": _round(high), "n": len(values),
            "n_eff": round(n_eff, 2), "population_covered": covered}


def _constant(side: Sequence[bool], weights: Sequence[float]) -> bool:
    yes = sum(w for w, v in zip(weights, side) if v)
    return yes <= 0 or yes >= sum(weights)


def table_kappa(tp: float, fp: float, fn: float, tn: float) -> float | None:
    """Cohen's kappa of a (weighted) 2x2 table of ``said`` against ``truth``; None where either side is
    constant (the same answer for every item)."""
    total = tp + fp + fn + tn
    if total <= 0:
        return None
    said, truth = (tp + fp) / total, (tp + fn) / total
    if said in (0.0, 1.0) or truth in (0.0, 1.0):
        return None
    expected = said * truth + (1 - said) * (1 - truth)
    return ((tp + tn) / total - expected) / (1 - expected)


def binary_table(said: Sequence[bool], truth: Sequence[bool], strata: Sequence[str],
                 populations: dict[str, int]) -> dict:
    """Precision P(truth | said yes), recall P(said yes | truth), agreement and Cohen's kappa of ``said``
    (a referee, the vote, a check) against the person's ``truth``, weighted by stratum; ``n`` and ``counts``
    are the labelled rows as they are. A figure that cannot be computed is null and named in ``reasons``."""
    weights = stratum_weights(strata, populations) if said else []
    cells = {"tp": 0.0, "fp": 0.0, "fn": 0.0, "tn": 0.0}
    counts = dict.fromkeys(cells, 0)
    for s, t, w in zip(said, truth, weights):
        cell = ("tp" if t else "fp") if s else ("fn" if t else "tn")
        cells[cell] += w
        counts[cell] += 1
    tp, fp, fn, tn = cells["tp"], cells["fp"], cells["fn"], cells["tn"]
    total = tp + fp + fn + tn
    reasons = {}
    if not said:
        reasons["all"] = "no labelled sample enters this table"
    elif tp + fp <= 0:
        reasons["precision"] = "it said yes to no labelled sample"
    if said and tp + fn <= 0:
        reasons["recall"] = "the person found no labelled sample good"
    kappa = table_kappa(tp, fp, fn, tn)
    unweighted = None
    if said and (_constant(said, [1] * len(said)) or _constant(truth, [1] * len(truth))):
        reasons["kappa"] = ("one side gave the same answer for every labelled sample: kappa is 0 or undefined "
                            "by construction and says nothing")
    elif said:
        unweighted = cohen_kappa([int(v) for v in said], [int(v) for v in truth])
    return {
        "n": len(said), "counts": counts,
        # the questions the table speaks for: strata with no labelled row here are not in it
        "population_covered": sum(populations[s] for s in set(strata)),
        "precision": _round(tp / (tp + fp)) if tp + fp > 0 else None,
        "recall": _round(tp / (tp + fn)) if tp + fn > 0 else None,
        "agreement": _round((tp + tn) / total) if total > 0 else None,
        "kappa": _round(kappa), "kappa_unweighted": _round(unweighted),
        **({"reasons": reasons} if reasons else {}),
    }


def _table_of(rows: Sequence[AuditRow], populations: dict[str, int], said: Callable[[AuditRow], bool | None],
              truth: Callable[[AuditRow], bool | None]) -> dict:
    """``binary_table`` over the rows where both sides are known; ``left_out`` counts the others."""
    pairs = [(said(r), truth(r), r.stratum) for r in rows]
    usable = [p for p in pairs if p[0] is not None and p[1] is not None]
    table = binary_table([p[0] for p in usable], [p[1] for p in usable], [p[2] for p in usable], populations)
    return {**table, "left_out": {"no_vote": sum(p[0] is None for p in pairs),
                                  "person_unknown": sum(p[0] is not None and p[1] is None for p in pairs)}}


def _vote(name: str) -> Callable[[AuditRow], bool | None]:
    return lambda r: None if r.votes.get(name) is None else r.votes[name] == 1


def blind_answered(row: AuditRow, name: str, threshold: float) -> bool | None:
    """The blind referee answered the question right without the image (what fails a sample as
    ``answerable_without_image``): its agreement (p_yes) at ``threshold``, else its vote; None when it did
    not vote. The final stage's rule (``processors.quality.plan``)."""
    if row.votes.get(name) is None and row.p_yes.get(name) is None:
        return None
    agreement = row.p_yes.get(name)
    return agreement >= threshold if agreement is not None else row.votes.get(name) == 1


def kept_accuracy(rows: Sequence[AuditRow], populations: dict[str, int], kept_population: int) -> dict:
    """Among kept samples: the estimated share whose answer is correct, that fit, that are good (each with
    its interval), how many labelled rows had an unknown answer, and the wrong answers projected to all
    ``kept_population`` kept samples of the run."""
    kept = [r for r in rows if r.kept]
    figures = {}
    for name in ("answer_correct", "fits", "good"):
        usable = [r for r in kept if getattr(r, name) is not None]
        figures[name] = weighted_share([getattr(r, name) for r in usable], [r.stratum for r in usable],
                                       populations)
    figures["labelled_kept"] = len(kept)
    figures["answer_unknown"] = sum(r.answer_correct is None for r in kept)
    accuracy = figures["answer_correct"]
    if accuracy["share"] is None:
        figures["projected_wrong_answers"] = {"estimate": None, "low": None, "high": None,
                                              "kept_population": kept_population,
                                              "reason": accuracy["reason"]}
    else:
        figures["projected_wrong_answers"] = {
            "estimate": round((1 - accuracy["share"]) * kept_population),
            "low": round((1 - accuracy["high"]) * kept_population),
            "high": round((1 - accuracy["low"]) * kept_population),
            "kept_population": kept_population, **({"exact": True} if accuracy.get("exact") else {})}
    return figures


def referee_figures(rows: Sequence[AuditRow], populations: dict[str, int], checks: Checks) -> dict:
    """Each counting referee and the vote (the final stage's keep decision) against the person's ``good``
    (and ``fits``: the counting referees never see the answer); each answer referee against
    ``answer_correct``; each blind referee's "needs the image" (it could not answer without it) against
    ``needs_image``. Over every labelled row, kept and dropped, weighted to the run."""
    def both(said):
        return {"good": _table_of(rows, populations, said, lambda r: r.good),
                "fits": _table_of(rows, populations, said, lambda r: r.fits)}

    def blind(name):
        return lambda r: None if (a := blind_answered(r, name, checks.blind_f1_threshold)) is None else not a

    return {
        "referees": {name: both(_vote(name)) for name in checks.counting},
        "vote": both(lambda r: r.kept),
        "answer_check": {name: _table_of(rows, populations, _vote(name), lambda r: r.answer_correct)
                         for name in checks.answer_referees},
        "blind_check": {name: _table_of(rows, populations, blind(name), lambda r: r.needs_image)
                        for name in checks.blind_referees},
    }


def inter_annotator(first: dict[str, dict], second: dict[str, dict]) -> dict:
    """Agreement and Cohen's kappa between two people per label, over the qa_ids both labelled (both values
    known); unweighted: it is about the people on the same items, not an estimate for the run."""
    common = sorted(set(first) & set(second))
    out = {"common": len(common)}
    for name in LABEL_FIELDS:
        pairs = [(first[q][name], second[q][name]) for q in common
                 if first[q].get(name) is not None and second[q].get(name) is not None]
        a, b = [int(x) for x, _ in pairs], [int(y) for _, y in pairs]
        entry = {"n": len(pairs), "agreement": _round(sum(x == y for x, y in pairs) / len(pairs)) if pairs else None,
                 "kappa": None}
        if not pairs:
            entry["reason"] = "no sample both people labelled"
        elif len(set(a)) < 2 or len(set(b)) < 2:
            entry["reason"] = "one person gave the same answer for every sample: kappa says nothing"
        else:
            entry["kappa"] = _round(cohen_kappa(a, b))
        out[name] = entry
    return out


def audit_figures(rows: Sequence[AuditRow], populations: dict[str, int], checks: Checks, *,
                  kept_population: int) -> dict:
    """Every figure of the audit of ``rows`` (one person's labels), as JSON-ready data (no NaN)."""
    strata = Counter(r.stratum for r in rows)
    return {
        "labelled": len(rows),
        "labelled_kept": sum(r.kept for r in rows),
        "labelled_dropped": sum(not r.kept for r in rows),
        "strata": {name: {"population": populations[name], "labelled": strata.get(name, 0)}
                   for name in sorted(populations)},
        "kept_accuracy": kept_accuracy(rows, populations, kept_population),
        **referee_figures(rows, populations, checks),
    }
