"""Step 3b, ``filter``: GPT-4o sees each image with its CLIP candidates and keeps those that really fit.

One request per image, the whole shard in one ``EndpointCall.send`` (async stays inside the engine). A
label in the reply that is none of the image's candidates is an item failure ``label_not_in_candidates``
(counted, never kept); an image with nothing left fails ``no_match``; a reply that never parses fails
``unparsable`` with its text; API failures keep the engine's reason (``api_error``, ``timeout``, ...).
"""

from __future__ import annotations

from pydantic import Field

from builder.stage import StageConfig
from processors.filter.prompt import PROMPT_VERSION, SCHEMA_VERSION
from processors.stages.llm_stage import LLMStage

PROMPT_BASE_CHARS = 900  # estimate: the instruction around the candidates
PROMPT_CHARS_PER_CANDIDATE = 48
REPLY_TOKENS = 60


class FilterConfig(StageConfig):
    endpoint: str = Field("gpt4o", description="which llm.endpoints entry answers")
    max_candidates: int = Field(10, ge=1, description="at most this many of the match stage's candidates are shown")
    use_json_schema: bool = Field(True, description="constrain the reply to the candidates (structured output)")
    max_tokens: int = Field(400, ge=16)
    temperature: float = Field(0.0, ge=0, le=2)


class FilterStage(LLMStage):
    name = "filter"
    Config = FilterConfig
    description = "the task types GPT-4o kept for each image"
    key = "image_id"
    upstream = "match"
    side_inputs = ("images",)
    reply_tokens = REPLY_TOKENS
    images_per_request = 1

    def input_key(self, config: FilterConfig) -> str:
        return "image_id"

    def fingerprint_parts(self, config: FilterConfig) -> dict:
        return {"prompt_version": PROMPT_VERSION, "schema_version": SCHEMA_VERSION if config.use_json_schema else None}

    def features(self, config: FilterConfig):
        import datasets

        return datasets.Features({"image_id": datasets.Value("string"),
                                  "task_types": datasets.List(datasets.Value("string"))})

    def estimated_requests(self, config: FilterConfig, run_config, assumptions) -> int:
        return assumptions.images

    def estimated_prompt_chars(self, config: FilterConfig, run_config) -> int:
        candidates = min(config.max_candidates, run_config.stages.match.top_k)
        return PROMPT_BASE_CHARS + candidates * PROMPT_CHARS_PER_CANDIDATE

    def make_batch_fn(self, config: FilterConfig, ctx):
        from processors.filter.keep import run_batch

        image_file = self.image_locator(ctx)
        send = self.llm_call(config, ctx).send

        def keep(batch: dict[str, list]) -> dict[str, list]:
            return run_batch(batch, config, image_file=image_file, send=send).to_columns()

        return keep
