"""One batch of images through the filter step: requests, one engine call, rows and failures.

The LLM-stage shape the QA step has too (``processors.qa.generate``): request building and reading the
replies live here, the engine call is injected (``send``), so the stage module only wires the context.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from builder.rows import BatchOutput
from processors.filter.labels import CandidateIndex, match_labels
from processors.filter.parse import parse_labels
from processors.filter.prompt import PROMPT_VERSION, build_messages, json_schema
from processors.image_locator import IMAGE_MISSING, ImageUnavailable
from processors.llm.request import LLMRequest, LLMResult

COLUMNS = ("image_id", "task_types")


def build_request(image_id: str, image_path: str, candidates: list[str], config: Any) -> LLMRequest:
    return LLMRequest(
        key=image_id, messages=build_messages(image_path, candidates), prompt_version=PROMPT_VERSION,
        parse=parse_labels, json_schema=json_schema(candidates) if config.use_json_schema else None,
        schema_name="kept_task_types", max_tokens=config.max_tokens, temperature=config.temperature,
    )


def run_batch(batch: dict[str, list], config: Any, *, image_file: Callable[[str], Path],
              send: Callable[[list[LLMRequest]], list[LLMResult]]) -> BatchOutput:
    """Filter rows for a batch of match rows (``image_id``, ``candidates``).

    ``image_file(image_id)`` gives the file or raises ``ImageUnavailable`` (that row fails alone);
    ``send(requests)`` is the engine call."""
    out = BatchOutput(COLUMNS)
    candidates: dict[str, list[str]] = {}
    for image_id, found in zip(batch["image_id"], batch["candidates"]):
        kept = [c["task_type"] for c in (found or [])[: config.max_candidates]]
        if not kept:
            out.fail(image_id, "no_candidates", "the match stage gave this image no candidate task types")
            continue
        candidates[image_id] = kept
    requests = []
    for image_id, kept in candidates.items():
        try:
            requests.append(build_request(image_id, str(image_file(image_id)), kept, config))
        except ImageUnavailable as exc:
            out.fail(image_id, IMAGE_MISSING, str(exc))
    for result in send(requests) if requests else []:
        record(out, result, candidates[result.key])
    return out


def record(out: BatchOutput, result: LLMResult, candidates: list[str]) -> None:
    """One image's outcome: its kept labels (invented ones are item failures), or why it has none."""
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
