"""Step 3b, ``filter``: GPT-4o sees each image with its CLIP candidates and keeps those that really fit.

One request per image, the whole shard in one ``run_requests`` call (async stays inside the engine). A
label in the reply that is none of the image's candidates is an item failure ``label_not_in_candidates``
(counted, never kept); an image with nothing left fails ``no_match``; a reply that never parses fails
``unparsable`` with its text; API failures keep the engine's reason (``api_error``, ``timeout``, ...).
"""

from __future__ import annotations

from pydantic import Field

from builder.outputs import image_paths_by_id
from builder.rows import BatchOutput
from builder.stage import Stage, StageConfig
from processors.filter.labels import CandidateIndex, match_labels
from processors.filter.parse import parse_labels
from processors.filter.prompt import PROMPT_VERSION, SCHEMA_VERSION, build_messages, json_schema

COLUMNS = ("image_id", "task_types")


class FilterConfig(StageConfig):
    endpoint: str = Field("gpt4o", description="which llm.endpoints entry answers")
    max_candidates: int = Field(10, ge=1, description="at most this many of the match stage's candidates are shown")
    use_json_schema: bool = Field(True, description="constrain the reply to the candidates (structured output)")
    max_tokens: int = Field(400, ge=16)
    temperature: float = Field(0.0, ge=0, le=2)


class FilterStage(Stage):
    name = "filter"
    Config = FilterConfig
    key = "image_id"
    upstream = "match"
    side_inputs = ("images",)
    batch_size = None

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

    def make_batch_fn(self, config: FilterConfig, ctx):
        from loaders.images.paths import load_roots, resolve_image_path
        from processors.llm.api import run_requests
        from processors.llm.request import LLMRequest

        images = ctx.load_stage("images")
        path_of = image_paths_by_id(images)
        roots = load_roots(ctx.run_dir)

        def request(image_id: str, candidates: list[str]) -> LLMRequest:
            path = str(resolve_image_path(ctx.run_dir, path_of[image_id], roots))
            return LLMRequest(
                key=image_id, messages=build_messages(path, candidates), prompt_version=PROMPT_VERSION,
                parse=parse_labels, json_schema=json_schema(candidates) if config.use_json_schema else None,
                schema_name="kept_task_types", max_tokens=config.max_tokens, temperature=config.temperature,
            )

        def keep(batch: dict[str, list]) -> dict[str, list]:
            out = BatchOutput(COLUMNS)
            candidates = {
                image_id: [c["task_type"] for c in found[: config.max_candidates]]
                for image_id, found in zip(batch["image_id"], batch["candidates"])
            }
            todo = [image_id for image_id, found in candidates.items() if found]
            for image_id in candidates.keys() - set(todo):
                out.fail(image_id, "no_candidates", "the match stage gave this image no candidate task types")
            results = run_requests([request(i, candidates[i]) for i in todo], endpoint=config.endpoint, ctx=ctx)
            for result in results:
                _record(out, result, candidates[result.key])
            return out.to_columns()

        return keep


def _record(out: BatchOutput, result, candidates: list[str]) -> None:
    image_id = result.key
    if not result.ok:
        out.fail(image_id, *result.failure())
        return
    kept, rejected = match_labels(result.value, CandidateIndex(candidates))
    for label in rejected:
        out.fail(image_id, "label_not_in_candidates", f"{label!r} is not one of the {len(candidates)} candidates",
                 item=label[:200])
    if kept:
        out.add(image_id, {"image_id": image_id, "task_types": kept})
    else:
        said = ", ".join(result.value) if result.value else "none"
        out.fail(image_id, "no_match", f"the model kept none of the candidates (it said: {said[:300]})")
