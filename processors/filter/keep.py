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
from processors.filter import fused
from processors.filter.prompt import PROMPT_VERSION, build_layout_messages, build_messages, json_schema
from processors.image_locator import IMAGE_MISSING, ImageUnavailable
from processors.llm.request import LLMRequest, LLMResult
from processors.prompt_layout import LAYOUT_VERSION, SCHEMA_NAME, prompt_cache_key, shared_schema

COLUMNS = ("image_id", "task_types")


def build_request(image_id: str, image_path: str, candidates: list[str], config: Any) -> LLMRequest:
    if getattr(config, "prompt_layout", "paper") == "cache_friendly":  # processors.prompt_layout
        return LLMRequest(
            key=image_id, messages=build_layout_messages(image_path, candidates),
            prompt_version=f"{PROMPT_VERSION}+{LAYOUT_VERSION}", parse=parse_labels,
            json_schema=shared_schema() if config.use_json_schema else None, schema_name=SCHEMA_NAME,
            max_tokens=config.max_tokens, temperature=config.temperature, prompt_cache_key=prompt_cache_key(image_id))
    return LLMRequest(
        key=image_id, messages=build_messages(image_path, candidates), prompt_version=PROMPT_VERSION,
        parse=parse_labels, json_schema=json_schema(candidates) if config.use_json_schema else None,
        schema_name="kept_task_types", max_tokens=config.max_tokens, temperature=config.temperature,
    )


def run_batch(batch: dict[str, list], config: Any, *, image_file: Callable[[str], Path],
              send: Callable[[list[LLMRequest]], list[LLMResult]], qa_config: Any = None) -> BatchOutput:
    """Filter rows for a batch of match rows (``image_id``, ``candidates``).

    ``image_file(image_id)`` gives the file or raises ``ImageUnavailable`` (that row fails alone);
    ``send(requests)`` is the engine call. With ``qa_config`` (``fuse_qa`` on) each request is the fused one
    (``processors.filter.fused``) and each row carries its QA items in ``fused_qa``."""
    out = BatchOutput((*COLUMNS, fused.COLUMN) if qa_config is not None else COLUMNS)
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
            path = str(image_file(image_id))
        except ImageUnavailable as exc:
            out.fail(image_id, IMAGE_MISSING, str(exc))
            continue
        requests.append(build_request(image_id, path, kept, config) if qa_config is None
                        else fused.build_request(image_id, path, kept, config, qa_config))
    for result in send(requests) if requests else []:
        record(out, result, candidates[result.key])
    return out


def record(out: BatchOutput, result: LLMResult, candidates: list[str]) -> None:
    """One image's outcome: its kept labels (invented ones are item failures), or why it has none. A fused
    reply (a dict) also gives the row its ``fused_qa`` items."""
    image_id = result.key
    if not result.ok:
        out.fail(image_id, *result.failure())
        return
    labels, extra = result.value, {}
    if isinstance(labels, dict):  # a fused reply: {"task_types": [...], "qa": [...]}
        labels, extra = labels["task_types"], {fused.COLUMN: fused.fused_cell(labels["qa"])}
    kept, rejected = match_labels(labels, CandidateIndex(candidates))
    for label in rejected:
        out.fail(image_id, "label_not_in_candidates", f"{label!r} is not one of the {len(candidates)} candidates",
                 item=label[:200])
    if kept:
        out.add(image_id, {"image_id": image_id, "task_types": kept, **extra})
    else:
        said = ", ".join(labels) if labels else "none"
        out.fail(image_id, "no_match", f"the model kept none of the candidates (it said: {said[:300]})")
