"""Step 4, ``qa``: one GPT-4o request per image with its kept task types; one row per valid question–answer.

Input rows are the ``filter`` stage's (``image_id``, ``task_types`` as full ``~`` paths); the image files
come from the ``images`` stage (a side input). The whole shard crosses into the async engine once
(``batch_size=None``): all requests, one ``EndpointCall.send``, one repair call for replies that did not
parse, then validation (``processors.qa``). Rows: ``qa_id, image_id, task_type, question, answer, model,
prompt_version``; ``qa_id = text_id(image_id, task_type, question)``. Under ``--dry-run`` the ``model``
column reads ``simulator:<model id>`` so simulated rows can never pass for real ones.

Example::

    qa:
      endpoint: gpt4o
      questions_per_type: 1
      language: en
"""

from __future__ import annotations

from builder.stage import BatchFn, StageContext
from processors.qa.config import QAConfig
from processors.qa.generate import COLUMNS, run_batch
from processors.qa.prompt import PROMPT_VERSION, REPAIR_VERSION, SCHEMA_VERSION
from processors.qa.validate import VALIDATE_VERSION
from processors.prompt_layout import layout_parts
from processors.stages.llm_stage import LLMStage


def fused(run_config) -> bool:
    """Whether the filter stage writes this stage's QA in its own requests (``stages.filter.fuse_qa``)."""
    return bool(getattr(getattr(run_config.stages, "filter", None), "fuse_qa", False))


class QAStage(LLMStage):
    name = "qa"
    Config = QAConfig
    description = "one generated question and answer per image and task type"
    key = "qa_id"
    upstream = "filter"
    side_inputs = ("images",)

    def input_key(self, config: QAConfig) -> str:
        return "image_id"

    def fingerprint_parts(self, config: QAConfig) -> dict:
        return {"prompt_version": PROMPT_VERSION, "repair_version": REPAIR_VERSION,
                "validate_version": VALIDATE_VERSION,
                "schema_version": SCHEMA_VERSION if config.use_json_schema else None,
                **layout_parts(config.prompt_layout)}

    def settings_parts(self, config: QAConfig, settings) -> dict:
        parts = super().settings_parts(config, settings)
        if fused(settings):  # the rows come from the filter's fused replies, not from this stage's requests
            from processors.filter.fused import FUSED_VERSION

            parts["fused_with_filter"] = FUSED_VERSION
        return parts

    def features(self, config: QAConfig):
        import datasets

        return datasets.Features({column: datasets.Value("string") for column in COLUMNS})

    def estimate(self, config: QAConfig, run_config, assumptions):
        # Per image, not per request: some replies need a repair turn (processors.qa.estimate).
        import math

        from processors.llm.estimate import Projection
        from processors.qa.estimate import estimate_per_image

        if fused(run_config):  # the filter's one request per image wrote the QA too (its estimate counts it)
            return [("qa", Projection(0, 0, 0, 0.0))]
        passing = assumptions.images * assumptions.filter_pass
        per_image = estimate_per_image(config, run_config.llm, types_per_image=assumptions.kept_per_image)
        return [("qa", Projection(math.ceil(passing * per_image.requests), round(passing * per_image.prompt_tokens),
                                  round(passing * per_image.completion_tokens), passing * per_image.cost_usd))]

    def make_batch_fn(self, config: QAConfig, ctx: StageContext) -> BatchFn:
        if fused(ctx.settings):  # no request: the fused filter's replies, validated as ours would be
            from processors.qa.generate import run_fused_batch

            filter_model = ctx.settings.llm.endpoint(ctx.settings.stages.filter.endpoint).model
            model = f"simulator:{filter_model}" if ctx.dry_run else filter_model
            return lambda batch: run_fused_batch(batch, config, model=model).to_columns()
        try:
            call = self.llm_call(config, ctx)
        except KeyError as exc:  # the endpoint is not configured: name the key
            raise ValueError(f"stages.qa.endpoint: {exc.args[0]}") from None
        # Simulated rows can never pass for real ones.
        model = f"simulator:{call.model}" if ctx.dry_run else call.model
        image_file = self.image_locator(ctx)

        def generate(batch: dict[str, list]) -> dict[str, list]:
            out = run_batch(batch, config, image_file=image_file, model=model, send=call.send,
                            add_usage=ctx.add_usage)
            return out.to_columns()

        return generate
