"""Stage ``final`` (step 5, selection): keep a scored QA when its referee votes reach the threshold.

Kept samples leave in the LLaVA shape the paper released (``id, image, task_type, conversations``) plus the
keys that trace each one back (``qa_id``, ``image_id``) and its vote total; the rest fail with
``vote_below_threshold`` (or ``vote_missing`` under the ``fail`` policy of the score stage), naming the votes.

Beyond the paper, all off by default (``configs/taskgalaxy.yaml`` keeps the paper's protocol): answer and
text-only referees as separate gates, decontamination against benchmarks, and a balanced selection of exactly
``target_total`` samples. These decisions need the whole score table (a balanced selection is global), so
``make_batch_fn`` plans every row once (``processors.quality.plan``) and each batch looks its rows up.
``finalize`` writes the quality report (coverage, referee agreement, what each check rejected) as
``stats.json`` (shown by ``taskgalaxy status``), a card section and plots.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pydantic import Field, model_validator

from builder.outputs import column_values, image_paths_by_id
from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig
from processors.quality.decontam_config import DecontaminationConfig

logger = logging.getLogger(__name__)

LLAVA_ID_CHARS = 16
# Bump when what final keeps for a given config changes. It enters the fingerprint only when an option beyond
# the paper is on, so the paper-faithful config keeps the fingerprint it had before them ("2": those options).
FINAL_VERSION = "2"
PLAN_COLUMNS = ("qa_id", "image_id", "task_type", "question", "votes", "p_yes")


class FinalConfig(StageConfig):
    threshold: int = Field(2, ge=0, description="keep a sample when its votes sum to at least this (paper: 2 of 3)")
    target_total: int | None = Field(
        None, ge=1, description="keep exactly this many samples (fewer only if fewer pass), balanced over "
        "first-level categories and task types, best mean p(yes) first; the rest fail as balance_target. "
        "null = keep every sample that passes (the paper)")
    per_task_max: int | None = Field(None, ge=1, description="at most this many samples per task type (the "
                                     "best by mean p(yes)); the rest fail as balance_cap. null = no cap")
    per_task_min: int = Field(0, ge=0, description="with target_total: every task type's best this-many "
                              "samples are picked before any type gets more")
    seed: int = Field(0, description="breaks ties between equal p(yes) (a hash of seed and qa_id)")
    answer_referees: list[str] = Field(
        default_factory=list, description="score referees (run with see_answer: true) that judge the answer's "
        "correctness: not counted in the threshold; a 0 from one fails the sample as answer_incorrect. Their "
        "votes follow stages.score.missing_vote like any referee's: under `fail` (the default) an outage of "
        "one of them drops the rows it could not judge as vote_missing, even rows the protocol would keep; "
        "`abstain` lets such a row through unchecked (its `missing` list names the referee)")
    blind_referees: list[str] = Field(
        default_factory=list, description="score referees with blind: true (a text-only model answers the "
        "question without the image; processors.referees.blind): not counted in the threshold; a sample it "
        "answers right fails as answerable_without_image. stages.score.missing_vote applies to them as to the "
        "answer_referees (under `fail` an outage drops rows as vote_missing)")
    blind_f1_threshold: float = Field(
        0.5, gt=0, le=1, description="a blind referee's answer agrees with the sample's when their agreement "
        "(its p_yes: 1/0 for option letters and short answers, token F1 for long ones) is at least this")
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    reports: bool = Field(True, description="write the quality report and plots (finalize); off: only the rows")

    @model_validator(mode="after")
    def _consistent(self) -> "FinalConfig":
        if self.per_task_min and self.per_task_max is not None and self.per_task_min > self.per_task_max:
            raise ValueError(f"per_task_min ({self.per_task_min}) is more than per_task_max ({self.per_task_max})")
        both = set(self.answer_referees) & set(self.blind_referees)
        if both:
            raise ValueError(f"referees {sorted(both)} are listed as answer_referees and as blind_referees")
        return self


def llava_id(qa_id: str) -> str:
    """Stable across reruns because ``qa_id`` is content-derived (image bytes, task type, question)."""
    return f"tg-{qa_id[:LLAVA_ID_CHARS]}"


def conversations(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


class FinalStage(Stage):
    name = "final"
    description = "the kept samples in LLaVA form, images embedded (the default config)"
    Config = FinalConfig
    key = "qa_id"
    upstream = "score"
    side_inputs = ("images",)
    batch_size = 512

    def input_key(self, config: FinalConfig) -> str:
        return "qa_id"

    def fingerprint_config(self, config: FinalConfig) -> dict:
        # The paper's keys as they were (threshold and the base keys), plus only the additions set away from
        # their defaults; `reports` changes no row, and `seed` only breaks ties of a balanced selection.
        base = config.model_dump(mode="json", include={"threshold", *StageConfig.model_fields})
        extra = config.model_dump(mode="json", exclude_defaults=True, exclude={"reports", "seed", *base})
        if extra and _selects(config) and config.seed != FinalConfig.model_fields["seed"].default:
            extra["seed"] = config.seed
        return {**base, **extra}

    def fingerprint_parts(self, config: FinalConfig) -> dict:
        if not _beyond_paper(config):
            return {}  # the paper's protocol: the fingerprint it always had
        parts: dict = {"final_version": FINAL_VERSION}
        if config.decontamination.enabled:
            from processors.quality.decontam import benchmark_identity

            parts["benchmarks"] = benchmark_identity(config.decontamination)
        return parts

    def resources(self, config: FinalConfig) -> dict:
        # The CLIP near-copy check embeds images with the match stage's CLIP (once: the plan is a file the
        # other workers read), so then one GPU worker; otherwise (the dHash check, near_hash_distance, alone
        # included) the default (cheap CPU tasks).
        d = config.decontamination
        if d.benchmark_images and d.near_threshold is not None:
            return {"kind": "gpu", "num_cpus": 1, "num_gpus": 1, "workers": 1, "runtime_env": None,
                    "gpu_optional": True}
        return super().resources(config)

    def features(self, config: FinalConfig):
        import datasets

        string = datasets.Value("string")
        return datasets.Features(
            {
                "id": string,
                "image": string,
                "task_type": string,
                "conversations": datasets.List({"from": string, "value": string}),
                "qa_id": string,
                "image_id": string,
                "votes_total": datasets.Value("int32"),
            }
        )

    def plan(self, config: FinalConfig, ctx):
        """The plan of every scored row, computed once per stage fingerprint and kept as ``plan.arrow`` in the
        stage folder: every batch function (in any worker) and ``finalize`` read that file, the first process
        to get there computes it (decontamination embeds images: never twice)."""
        from processors.quality.plan import PLAN_FILE, load_plan, save_plan
        from processors.shared_files import computed_once

        key = self._plan_key(config, ctx)
        return computed_once(Path(ctx.stage_dir) / PLAN_FILE, lambda path: load_plan(path, key),
                             lambda: self._compute_plan(config, ctx), lambda path, plan: save_plan(path, plan, key))

    def _plan_key(self, config: FinalConfig, ctx) -> str:
        from builder.ids import canonical_json
        from builder.outputs import stage_state

        reads = {}
        for name in ("score", "images"):
            try:
                reads[name] = stage_state(ctx.run_dir, name)[1].get("fingerprint")
            except Exception:  # noqa: BLE001 - a stage read another way (a test's context): its data decides
                reads[name] = None
        text = canonical_json([self.fingerprint_config(config), self.fingerprint_parts(config), reads])
        return hashlib.sha256(text.encode()).hexdigest()

    def _compute_plan(self, config: FinalConfig, ctx):
        from processors.quality.plan import plan_final

        score = ctx.load_stage("score")
        rows = {column: column_values(score, column) for column in PLAN_COLUMNS}
        known = set(column_values(ctx.load_stage("images"), "image_id"))
        contamination = None
        if config.decontamination.enabled:
            from processors.quality.decontam import contamination_check

            contamination = contamination_check(config.decontamination, ctx)
        return plan_final(config, rows, known_images=known, contamination=contamination)

    def make_batch_fn(self, config: FinalConfig, ctx):
        path_of = image_paths_by_id(ctx.load_stage("images"))
        columns = list(self.features(config))
        plan = self.plan(config, ctx)

        def select(batch: dict[str, list]) -> dict[str, list]:
            out = BatchOutput(columns)
            for i, qa_id in enumerate(batch["qa_id"]):
                if qa_id in plan.failures:
                    out.fail(qa_id, *plan.failures[qa_id])
                    continue
                image_id = batch["image_id"][i]
                out.add(qa_id, {
                    "id": llava_id(qa_id),
                    "image": path_of[image_id],
                    "task_type": batch["task_type"][i],
                    "conversations": conversations(batch["question"][i], batch["answer"][i]),
                    "qa_id": qa_id,
                    "image_id": image_id,
                    "votes_total": plan.protocol_total[qa_id],
                })
            return out.to_columns()

        return select

    def finalize(self, config: FinalConfig, ctx, output) -> None:
        if not config.reports:
            return
        from processors.quality.report import write_reports

        special = set(config.answer_referees) | set(config.blind_referees)
        protocol = [r.name for r in ctx.settings.stages.score.referees if r.name not in special]
        write_reports(ctx, summary=self.plan(config, ctx).summary, referees=protocol, output=output)


def _selects(config: FinalConfig) -> bool:
    """A balanced selection is on (the only use of ``seed``)."""
    return config.target_total is not None or config.per_task_max is not None or bool(config.per_task_min)


def _beyond_paper(config: FinalConfig) -> bool:
    return bool(_selects(config) or config.answer_referees or config.blind_referees
                or config.decontamination.enabled)
