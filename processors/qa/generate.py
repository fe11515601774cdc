"""One shard of images through the QA step: requests, one engine call, one repair round, validated rows.

The engine's ``parse`` (``processors.qa.parse.parse_reply``) rejects only replies with no QA-shaped JSON at
all, so a reply with one bad item is neither retried nor paid for twice; items are judged afterwards
(``processors.qa.validate``). Replies that stay ``unparsable`` after the engine's retries get one follow-up
turn asking for valid JSON — a second ``send`` for just those rows; both calls go through the
request cache, so a rerun after a crash pays for neither again.

Per input row: every valid item is an output row; every rejected item an item failure with its reason; a
row with no valid item leaves as one row failure (``no_valid_qa``, or the engine's reason such as
``unparsable``/``api_error``/``truncated``, or ``image_missing``/``no_task_types`` before any request).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.ids import text_id
from builder.rows import BatchOutput
from processors.llm.request import UNPARSABLE, LLMRequest, LLMResult
from processors.qa.config import QAConfig
from processors.qa.parse import parse_reply
from processors.image_locator import IMAGE_MISSING, ImageUnavailable
from processors.prompt_layout import LAYOUT_VERSION, SCHEMA_NAME, prompt_cache_key, shared_schema
from processors.qa.prompt import (PROMPT_VERSION, REPAIR_VERSION, build_layout_messages, build_messages, json_schema,
                                  repair_messages)
from processors.qa.validate import QA, validate_items

logger = logging.getLogger(__name__)

COLUMNS = ("qa_id", "image_id", "task_type", "question", "answer", "model", "prompt_version")
RAW_TEXT_SHOWN = 300


@dataclass
class Job:
    image_id: str
    task_types: list[str]
    request: LLMRequest
    answered_by: LLMRequest | None = None  # the repair request, when the reply came from one


def build_request(image_id: str, image_path: str, task_types: list[str], config: QAConfig) -> LLMRequest:
    if config.prompt_layout == "cache_friendly":  # processors.prompt_layout: the task types checked after parsing
        return LLMRequest(
            key=image_id, prompt_version=f"{PROMPT_VERSION}+{LAYOUT_VERSION}", parse=parse_reply,
            messages=build_layout_messages(image_path, task_types, per_type=config.questions_per_type,
                                           language=config.language),
            json_schema=shared_schema() if config.use_json_schema else None, schema_name=SCHEMA_NAME,
            max_tokens=config.max_tokens, temperature=config.temperature, prompt_cache_key=prompt_cache_key(image_id))
    return LLMRequest(
        key=image_id,
        messages=build_messages(image_path, task_types, per_type=config.questions_per_type, language=config.language),
        prompt_version=PROMPT_VERSION,
        parse=parse_reply,
        json_schema=json_schema(task_types, count=len(task_types) * config.questions_per_type)
        if config.use_json_schema else None,
        schema_name="qa_pairs",
        max_tokens=config.max_tokens,
        temperature=config.temperature,
    )


def build_repair(job: Job, bad_reply: str) -> LLMRequest:
    """The follow-up turn for a reply that did not parse; same settings, its own prompt version."""
    request = job.request
    return LLMRequest(
        key=request.key, messages=repair_messages(request.messages, bad_reply),
        prompt_version=f"{request.prompt_version}+{REPAIR_VERSION}", parse=parse_reply, json_schema=request.json_schema,
        schema_name=request.schema_name, max_tokens=request.max_tokens, temperature=request.temperature,
        prompt_cache_key=request.prompt_cache_key,
    )


def run_batch(batch: dict[str, list], config: QAConfig, *, image_file: Callable[[str], Path], model: str,
              send: Callable[[list[LLMRequest]], list[LLMResult]], add_usage: Callable[..., None]) -> BatchOutput:
    """QA rows for a batch of filter rows (``image_id``, ``task_types``).

    ``image_file(image_id)`` gives the file or raises ``ImageUnavailable``; ``send(requests)`` is the
    engine call (the stage's ``EndpointCall.send``); ``model`` is written into each row.
    """
    out = BatchOutput(COLUMNS)
    jobs = _jobs(batch, config, image_file, out)
    results = send([job.request for job in jobs]) if jobs else []
    results = _repair(jobs, results, config, send, add_usage)
    for job, result in zip(jobs, results):
        record(out, job, result, config, model)
    return out


def run_fused_batch(batch: dict[str, list], config: QAConfig, *, model: str) -> BatchOutput:
    """QA rows from the fused filter's replies (``fused_qa``): no request; each image's items go through the
    same ``record`` (validation, reasons) as a reply of this stage's own."""
    from processors.filter.fused import read_cell

    out = BatchOutput(COLUMNS)
    for image_id, task_types, cell in zip(batch["image_id"], batch["task_types"], batch["fused_qa"]):
        task_types = list(dict.fromkeys(t for t in (task_types or []) if t and t.strip()))
        if not task_types:
            out.fail(image_id, "no_task_types", "the filter stage kept no task type for this image")
            continue
        try:
            items, version = read_cell(cell)
        except ValueError as exc:
            out.fail(image_id, UNPARSABLE, f"fused_qa: {exc}")
            continue
        request = LLMRequest(key=image_id, messages=[], prompt_version=version)
        record(out, Job(image_id, task_types, request), LLMResult(image_id, True, value=items), config, model)
    return out


def _jobs(batch: dict[str, list], config: QAConfig, image_file: Callable[[str], Path], out: BatchOutput) -> list[Job]:
    jobs = []
    for image_id, task_types in zip(batch["image_id"], batch["task_types"]):
        task_types = list(dict.fromkeys(t for t in (task_types or []) if t and t.strip()))
        if not task_types:
            out.fail(image_id, "no_task_types", "the filter stage kept no task type for this image")
            continue
        try:
            path = image_file(image_id)
        except ImageUnavailable as exc:
            out.fail(image_id, IMAGE_MISSING, str(exc))
            continue
        jobs.append(Job(image_id, task_types, build_request(image_id, str(path), task_types, config)))
    return jobs


def _repair(jobs: list[Job], results: list[LLMResult], config: QAConfig,
            send: Callable[[list[LLMRequest]], list[LLMResult]], add_usage: Callable[..., None]) -> list[LLMResult]:
    """Replace each ``unparsable`` result by the outcome of one repair request (when enabled)."""
    todo = [i for i, r in enumerate(results) if not r.ok and r.reason == UNPARSABLE and r.raw_text]
    if not config.repair or not todo:
        return results
    logger.info("qa: %d replies did not parse; sending one repair request each", len(todo))
    requests = [build_repair(jobs[i], results[i].raw_text) for i in todo]
    repaired = send(requests)
    add_usage(repair_requests=len(todo), repaired=sum(r.ok for r in repaired))
    results = list(results)
    for i, request, result in zip(todo, requests, repaired):
        jobs[i].answered_by = request
        if not result.ok:
            first = results[i].raw_text or ""
            result = dataclasses.replace(result, detail=f"still {result.reason} after one repair request: "
                                         f"{result.detail or ''}; first reply: {first[:RAW_TEXT_SHOWN]!r}")
        results[i] = result
    return results


def record(out: BatchOutput, job: Job, result: LLMResult, config: QAConfig, model: str) -> None:
    """Rows and failures of one image from its engine result."""
    image_id = job.image_id
    if not result.ok:
        out.fail(image_id, *result.failure(shown_chars=RAW_TEXT_SHOWN))
        return
    accepted, rejected = validate_items(result.value, job.task_types, config)
    version = (job.answered_by or job.request).prompt_version
    for item in rejected:
        out.fail(image_id, item.reason, item.detail, item=item.item)
    for qa in accepted:
        out.add(image_id, qa_row(image_id, qa, model, version))
    if not accepted:
        reasons = sorted({r.reason for r in rejected}) or ["no items"]
        out.fail(image_id, "no_valid_qa", f"none of the {len(result.value)} items was valid ({', '.join(reasons)})")


def qa_row(image_id: str, qa: QA, model: str, prompt_version: str) -> dict[str, Any]:
    """An output row; ``prompt_version`` is the repair's (``qa-v1+qa-repair-v1``) when a repair answered."""
    return {"qa_id": text_id(image_id, qa.task_type, qa.question), "image_id": image_id,
            "task_type": qa.task_type, "question": qa.question, "answer": qa.answer, "model": model,
            "prompt_version": prompt_version}
