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
from processors.prompt_layout import PromptLayout, layout_parts
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
    # Both left out of dumps (and so of the fingerprint) at their defaults: the paper-faithful run is unchanged.
    prompt_layout: PromptLayout = Field(
        "paper", exclude_if=lambda value: value == "paper",
        description="cache_friendly: the preamble shared with the QA request, then the image, then the candidates, "
        "under one schema without per-image enums (processors/prompt_layout.py)")
    fuse_qa: bool = Field(
        False, exclude_if=lambda value: not value,
        description="one request per image keeps the candidates and writes their questions and answers (with "
        "stages.qa's settings); the qa stage then sends nothing and reads them from this stage's fused_qa column")


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
        # The layout adds a part only when it is not the paper's: the paper run's fingerprint never moves.
        return {"prompt_version": PROMPT_VERSION, "schema_version": SCHEMA_VERSION if config.use_json_schema else None,
                **layout_parts(config.prompt_layout)}

    def settings_parts(self, config: FilterConfig, settings) -> dict:
        parts = super().settings_parts(config, settings)
        if config.fuse_qa:  # the fused request is built from stages.qa's settings too
            from processors.filter.fused import fingerprint_parts

            parts["fused_qa"] = fingerprint_parts(settings.stages.qa)
        return parts

    def features(self, config: FilterConfig):
        import datasets

        columns = {"image_id": datasets.Value("string"), "task_types": datasets.List(datasets.Value("string"))}
        if config.fuse_qa:
            columns["fused_qa"] = datasets.Value("string")
        return datasets.Features(columns)

    def estimated_requests(self, config: FilterConfig, run_config, assumptions) -> int:
        return assumptions.images

    def estimated_prompt_chars(self, config: FilterConfig, run_config) -> int:
        candidates = min(config.max_candidates, run_config.stages.match.top_k)
        base = PROMPT_BASE_CHARS
        if config.fuse_qa or config.prompt_layout == "cache_friendly":
            from processors.prompt_layout import PREAMBLE

            base = len(PREAMBLE) + 300  # the preamble and the job's own words
        return base + candidates * PROMPT_CHARS_PER_CANDIDATE

    def estimate(self, config: FilterConfig, run_config, assumptions):
        if not config.fuse_qa:
            return super().estimate(config, run_config, assumptions)
        # Fused: one request per image whose reply also holds the QA items of the kept types.
        from processors.llm.estimate import project
        from processors.qa.estimate import QA_CHARS

        qa = run_config.stages.qa
        kept = assumptions.filter_pass * assumptions.kept_per_image * qa.questions_per_type
        reply = min(qa.max_tokens, round(REPLY_TOKENS + kept * QA_CHARS / 4))
        return [(self.name, project(run_config.llm, config.endpoint, requests=assumptions.images,
                                    images_per_request=1,
                                    prompt_text_chars=self.estimated_prompt_chars(config, run_config),
                                    completion_tokens=reply))]

    def make_batch_fn(self, config: FilterConfig, ctx):
        from processors.filter.keep import run_batch

        image_file = self.image_locator(ctx)
        send = self.llm_call(config, ctx).send

        qa_config = ctx.settings.stages.qa if config.fuse_qa else None

        def keep(batch: dict[str, list]) -> dict[str, list]:
            return run_batch(batch, config, image_file=image_file, send=send, qa_config=qa_config).to_columns()

        return keep
