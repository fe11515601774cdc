"""Step 3b, ``filter``: GPT-4o sees each image with its CLIP candidates and keeps those that really fit.

One request per image, the whole shard in one ``run_requests`` call (async stays inside the engine). A
label in the reply that is none of the image's candidates is an item failure ``label_not_in_candidates``
(counted, never kept); an image with nothing left fails ``no_match``; a reply that never parses fails
``unparsable`` with its text; API failures keep the engine's reason (``api_error``, ``timeout``, ...).
"""

from __future__ import annotations

from pydantic import Field

from builder.stage import Stage, StageConfig
from processors.filter.prompt import PROMPT_VERSION, SCHEMA_VERSION
from processors.llm.request import UNANSWERED


PROMPT_BASE_CHARS = 900  # estimate: the instruction around the candidates
PROMPT_CHARS_PER_CANDIDATE = 48
REPLY_TOKENS = 60


class FilterConfig(StageConfig):
    endpoint: str = Field("gpt4o", description="which llm.endpoints entry answers")
    max_candidates: int = Field(10, ge=1, description="at most this many of the match stage's candidates are shown")
    use_json_schema: bool = Field(True, description="constrain the reply to the candidates (structured output)")
    max_tokens: int = Field(400, ge=16)
    temperature: float = Field(0.0, ge=0, le=2)


class FilterStage(Stage):
    name = "filter"
    Config = FilterConfig
    sim_responder = "processors.filter.simulate:SIM_RESPONDER"
    key = "image_id"
    upstream = "match"
    side_inputs = ("images",)
    batch_size = None
    unanswered_reasons = UNANSWERED  # an API failure is asked again on the next run, never sealed

    def shards_in_flight(self, config) -> int:
        return 2  # the next shard's requests fill the window while this one's last answers come back

    def input_key(self, config: FilterConfig) -> str:
        return "image_id"

    def fingerprint_parts(self, config: FilterConfig) -> dict:
        return {"prompt_version": PROMPT_VERSION, "schema_version": SCHEMA_VERSION if config.use_json_schema else None}

    def llm_endpoints(self, config) -> list[str]:
        return [config.endpoint]

    def settings_parts(self, config, settings) -> dict:
        from processors.llm.settings import endpoint_parts

        return {"endpoint": endpoint_parts(settings, config.endpoint, key=f"stages.{self.name}.endpoint")}

    def features(self, config: FilterConfig):
        import datasets

        return datasets.Features({"image_id": datasets.Value("string"),
                                  "task_types": datasets.List(datasets.Value("string"))})

    def estimate(self, config: FilterConfig, run_config, assumptions):
        from processors.llm.estimate import project
        from processors.llm.settings import LLMSettings

        llm = getattr(run_config, "llm", None) or LLMSettings()
        candidates = min(config.max_candidates, run_config.stages.match.top_k)
        return [("filter", project(llm, config.endpoint, requests=assumptions.images, images_per_request=1,
                                   prompt_text_chars=PROMPT_BASE_CHARS + candidates * PROMPT_CHARS_PER_CANDIDATE,
                                   completion_tokens=REPLY_TOKENS))]

    def make_batch_fn(self, config: FilterConfig, ctx):
        from processors.filter.keep import run_batch
        from processors.image_locator import image_locator
        from processors.llm.api import run_requests

        image_file = image_locator(ctx)

        def send(requests):
            return run_requests(requests, endpoint=config.endpoint, ctx=ctx)

        def keep(batch: dict[str, list]) -> dict[str, list]:
            return run_batch(batch, config, image_file=image_file, send=send).to_columns()

        return keep
