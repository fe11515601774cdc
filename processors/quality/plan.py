"""What the ``final`` stage decides for every scored row, computed once over the whole score table.

The paper's protocol keeps a row when its referees' votes reach the threshold. On top of that, each optional
check may reject a row the protocol keeps — the answer-correctness referees (``answer_incorrect``), the
text-only referees (``answerable_without_image``) and decontamination (``benchmark_image``,
``benchmark_question``) — and the balanced selection may leave it out (``balance_cap``, ``balance_target``).
A row fails with the first reason that applies, in that order; ``rejected_by_check`` counts, for each check
on its own, how many rows the paper's protocol keeps that it rejects (one row may count under several).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from processors.quality.selection import Candidate, mean_p_yes, select_balanced

ANSWER_INCORRECT = "answer_incorrect"
ANSWERABLE_WITHOUT_IMAGE = "answerable_without_image"


@dataclass
class FinalPlan:
    failures: dict[str, tuple[str, str]]  # qa_id -> (reason, detail); every other row is kept
    protocol_total: dict[str, int]  # qa_id -> votes of the protocol referees (the paper's total)
    summary: dict = field(default_factory=dict)


def _shown(votes: dict, names) -> str:
    # A None vote is one the referee cascade did not ask, or one missing under the abstain policy.
    return ", ".join(f"{name}={votes.get(name) if votes.get(name) is not None else '-'}" for name in names)


def _answered_blind(votes: dict, p_yes: dict, name: str, config) -> bool:
    """The blind referee's answer agrees with the sample's: its agreement (p_yes) at the configured threshold,
    or its vote where no agreement was recorded."""
    agreement = p_yes.get(name)
    if agreement is not None:
        return agreement >= getattr(config, "blind_f1_threshold", 0.5)
    return votes.get(name) == 1


def plan_final(config, rows: dict[str, list], *, known_images: set[str],
               contamination: Callable[[dict[str, list]], dict[str, tuple[str, str]]] | None = None) -> FinalPlan:
    """``rows``: the score table as columns (``qa_id, image_id, task_type, question, votes, p_yes``).
    ``contamination`` maps the protocol-kept rows to the ones a benchmark claims (``qa_id -> (reason, detail)``)."""
    special = set(config.answer_referees) | set(config.blind_referees)
    failures: dict[str, tuple[str, str]] = {}
    totals: dict[str, int] = {}
    rejected = {ANSWER_INCORRECT: 0, ANSWERABLE_WITHOUT_IMAGE: 0, "benchmark_image": 0, "benchmark_question": 0}
    protocol_kept: list[int] = []
    for i, qa_id in enumerate(rows["qa_id"]):
        votes = rows["votes"][i]
        protocol = [name for name in votes if name not in special]
        total = sum(votes[name] for name in protocol if votes[name] is not None)
        totals[qa_id] = total
        if total < config.threshold:
            failures[qa_id] = ("vote_below_threshold",
                               f"votes {total} < {config.threshold} ({_shown(votes, protocol)})")
            continue
        if rows["image_id"][i] not in known_images:
            failures[qa_id] = ("image_missing", f"image {rows['image_id'][i]} is not in the images stage output")
            continue
        protocol_kept.append(i)
        found = []
        wrong = [name for name in config.answer_referees if votes.get(name) == 0]
        if wrong:
            found.append((ANSWER_INCORRECT, f"answer referee(s) {', '.join(wrong)} judged the answer wrong"))
        p_yes = rows["p_yes"][i] or {}
        blind = [name for name in config.blind_referees if _answered_blind(votes, p_yes, name, config)]
        if blind:
            found.append((ANSWERABLE_WITHOUT_IMAGE, f"text-only referee(s) {', '.join(blind)} answered it "
                          "correctly without the image"))
        for reason, _ in found:
            rejected[reason] += 1
        if found:
            failures[qa_id] = found[0]
    if contamination is not None and protocol_kept:
        subset = {column: [rows[column][i] for i in protocol_kept] for column in ("qa_id", "image_id", "question")}
        claimed = contamination(subset)
        for qa_id, (reason, detail) in claimed.items():
            rejected[reason] = rejected.get(reason, 0) + 1
            failures.setdefault(qa_id, (reason, detail))
    eligible = [Candidate(rows["qa_id"][i], rows["task_type"][i],
                          mean_p_yes({k: v for k, v in (rows["p_yes"][i] or {}).items() if k not in special}))
                for i in protocol_kept if rows["qa_id"][i] not in failures]
    selection = select_balanced(eligible, target_total=config.target_total, per_task_max=config.per_task_max,
                                per_task_min=config.per_task_min, seed=config.seed)
    failures.update(selection.dropped)
    summary = {
        "scored": len(rows["qa_id"]),
        "protocol_kept": len(protocol_kept),
        "rejected_by_check": rejected,
        "checks_run": _checks_run(config, contamination is not None),
        "selection": selection.summary,
        "kept": len(rows["qa_id"]) - len(failures),
    }
    return FinalPlan(failures=failures, protocol_total=totals, summary=summary)


def _checks_run(config, decontaminated: bool) -> list[str]:
    """The checks of ``rejected_by_check`` this config ran: a check that ran and rejected nothing is shown
    (``0``), one that did not run is not (its count is 0 as well)."""
    decontamination = getattr(config, "decontamination", None)
    return [name for name, ran in (
        (ANSWER_INCORRECT, bool(config.answer_referees)),
        (ANSWERABLE_WITHOUT_IMAGE, bool(config.blind_referees)),
        ("benchmark_image", decontaminated and bool(getattr(decontamination, "benchmark_images", True))),
        ("benchmark_question", decontaminated and bool(getattr(decontamination, "benchmark_questions", True))),
    ) if ran]


PLAN_FILE = "plan.arrow"


def save_plan(path, plan: FinalPlan, key: str) -> None:
    """The plan as an Arrow file (one row per scored ``qa_id``: its protocol total and, when it fails, the
    reason and detail; the summary and ``key`` in the schema metadata), written atomically under a unique
    temporary name: every batch, worker and ``finalize`` of the stage reads this one plan."""
    import json

    import pyarrow as pa

    from processors.shared_files import write_atomic

    ids = list(plan.protocol_total)
    failures = [plan.failures.get(qa_id) for qa_id in ids]
    table = pa.table({
        "qa_id": pa.array(ids, pa.string()),
        "total": pa.array([plan.protocol_total[qa_id] for qa_id in ids], pa.int32()),
        "reason": pa.array([f[0] if f else None for f in failures], pa.string()),
        "detail": pa.array([f[1] if f else None for f in failures], pa.string()),
    }, metadata={"plan_key": key, "summary": json.dumps(plan.summary, sort_keys=True)})

    def write(handle) -> None:
        with pa.ipc.new_file(handle, table.schema) as writer:
            writer.write_table(table)

    write_atomic(path, write)


def load_plan(path, key: str) -> FinalPlan | None:
    """The plan saved under ``key``; None when the file is of another key or unreadable (then recompute)."""
    import json

    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid):
        return None
    meta = table.schema.metadata or {}
    if meta.get(b"plan_key", b"").decode() != key:
        return None
    ids, totals = table.column("qa_id").to_pylist(), table.column("total").to_pylist()
    reasons, details = table.column("reason").to_pylist(), table.column("detail").to_pylist()
    failures = {qa_id: (reason, detail) for qa_id, reason, detail in zip(ids, reasons, details) if reason is not None}
    return FinalPlan(failures=failures, protocol_total=dict(zip(ids, totals)),
                     summary=json.loads(meta.get(b"summary", b"{}")))
