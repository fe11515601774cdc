"""Step 4, ``qa``: one GPT-4o request per image with its kept task types; one row per valid question–answer.

Input rows are the ``filter`` stage's (``image_id``, ``task_types`` as full ``~`` paths); the image files
come from the ``images`` stage (a side input). The whole shard crosses into the async engine once
(``batch_size=None``): all requests, one ``run_requests`` call, one repair call for replies that did not
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

from builder.stage import BatchFn, Stage, StageContext
from processors.image_locator import image_locator
from processors.llm.request import UNANSWERED
from processors.qa.config import QAConfig
from processors.qa.generate import COLUMNS, run_batch
from processors.qa.prompt import PROMPT_VERSION, REPAIR_VERSION, SCHEMA_VERSION
from processors.qa.validate import VALIDATE_VERSION


class QAStage(Stage):
    name = "qa"
    Config = QAConfig
    sim_responder = "processors.qa.simulate:SIM_RESPONDER"
    key = "qa_id"
    upstream = "filter"
    side_inputs = ("images",)
    batch_size = None
    unanswered_reasons = UNANSWERED  # an API failure is asked again on the next run, never sealed

    def shards_in_flight(self, config) -> int:
        return 2  # the next shard's requests fill the window while this one's last answers come back

    def input_key(self, config: QAConfig) -> str:
        return "image_id"

    def llm_endpoints(self, config) -> list[str]:
        return [config.endpoint]

    def settings_parts(self, config, settings) -> dict:
        from processors.llm.settings import endpoint_parts

        return {"endpoint": endpoint_parts(settings, config.endpoint, key=f"stages.{self.name}.endpoint")}

    def fingerprint_parts(self, config: QAConfig) -> dict:
        return {"prompt_version": PROMPT_VERSION, "repair_version": REPAIR_VERSION,
                "validate_version": VALIDATE_VERSION,
                "schema_version": SCHEMA_VERSION if config.use_json_schema else None}

    def features(self, config: QAConfig):
        import datasets

        return datasets.Features({column: datasets.Value("string") for column in COLUMNS})

    def estimate(self, config: QAConfig, run_config, assumptions):
        import math

        from processors.llm.estimate import Projection
        from processors.llm.settings import LLMSettings
        from processors.qa.estimate import estimate_per_image

        llm = getattr(run_config, "llm", None) or LLMSettings()
        passing = assumptions.images * assumptions.filter_pass
        per_image = estimate_per_image(config, llm, types_per_image=assumptions.kept_per_image)
        return [("qa", Projection(math.ceil(passing * per_image.requests), round(passing * per_image.prompt_tokens),
                                  round(passing * per_image.completion_tokens), passing * per_image.cost_usd))]

    def make_batch_fn(self, config: QAConfig, ctx: StageContext) -> BatchFn:
        from processors.llm.api import run_requests

        model = model_label(config, ctx)
        image_file = image_locator(ctx)

        def send(requests):
            return run_requests(requests, endpoint=config.endpoint, ctx=ctx)

        def generate(batch: dict[str, list]) -> dict[str, list]:
            out = run_batch(batch, config, image_file=image_file, model=model, send=send, add_usage=ctx.add_usage)
            return out.to_columns()

        return generate


def model_label(config: QAConfig, ctx: StageContext) -> str:
    """The model id the rows name; raises ``ValueError`` naming the key when the endpoint is not configured."""
    from processors.llm.api import llm_settings

    try:
        model = llm_settings(ctx).endpoint(config.endpoint).model
    except KeyError as exc:
        raise ValueError(f"stages.qa.endpoint: {exc.args[0]}") from None
    return f"simulator:{model}" if ctx.dry_run else model
