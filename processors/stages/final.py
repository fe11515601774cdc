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

import logging

from pydantic import Field, model_validator

from builder.outputs import column_values, image_paths_by_id
from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig
from processors.quality.decontam_config import DecontaminationConfig

logger = logging.getLogger(__name__)

LLAVA_ID_CHARS = 16
# Bump when what final keeps for a given config changes; "2": the quality report and plots (finalize).
FINAL_VERSION = "2"
_LAST_PLAN: dict = {}  # the last plan made in this process, with the context it was made for
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
        "correctness: not counted in the threshold; a 0 from one fails the sample as answer_incorrect")
    blind_referees: list[str] = Field(
        default_factory=list, description="score referees with blind: true (text only, no image): not counted "
        "in the threshold; a 1 (answered right without the image) fails it as answerable_without_image")
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
    Config = FinalConfig
    key = "qa_id"
    upstream = "score"
    side_inputs = ("images",)
    batch_size = 512

    def input_key(self, config: FinalConfig) -> str:
        return "qa_id"

    def fingerprint_config(self, config: FinalConfig) -> dict:
        # Only keys set away from their defaults besides the threshold, so a config that uses none of the
        # additions keeps the paper's key set; `reports` changes no row.
        data = config.model_dump(mode="json", exclude_defaults=True, exclude={"reports"})
        return {"threshold": config.threshold, **data}

    def fingerprint_parts(self, config: FinalConfig) -> dict:
        return {"final_version": FINAL_VERSION}

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
        _LAST_PLAN["plan"] = (ctx, plan)  # module state, not the stage's: a stage pickles to workers

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
        write_reports(ctx, summary=self._cached_plan(config, ctx).summary, referees=protocol, output=output)

    def _cached_plan(self, config: FinalConfig, ctx):
        """The plan ``make_batch_fn`` made for this very run (decontamination embeds images: not twice), or a
        fresh one when this run built no batch function (every shard was already done)."""
        cached = _LAST_PLAN.get("plan")
        if cached is not None and cached[0] is ctx:
            return cached[1]
        return self.plan(config, ctx)
