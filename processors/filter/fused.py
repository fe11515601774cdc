"""The fused filter + QA request (``stages.filter.fuse_qa: true``): one request per image keeps candidates and
writes the questions and answers for the kept ones.

The request uses the cache-friendly layout (``processors.prompt_layout``: preamble, image, job) with the QA
step's settings (questions per type, language, temperature, max_tokens, schema on or off). The reply is
``{"task_types": [...], "qa": [...]}``. The filter stage reads the labels exactly as from a filter reply
(``label_not_in_candidates``, ``no_match``) and keeps the QA items, unjudged, in its ``fused_qa`` column;
the qa stage judges them with the same validation as a reply of its own (``processors.qa.generate``), so a
bad item fails there with the usual reason. A reply that has labels but no QA list fails ``unparsable``
here (after the engine's retries); the QA step's repair turn is not used on a fused reply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from processors.filter.parse import parse_labels
from processors.llm.request import LLMRequest
from processors.prompt_layout import SCHEMA_NAME, LAYOUT_VERSION, layout_messages, prompt_cache_key, shared_schema
from processors.qa.parse import parse_reply
from processors.qa.prompt import PROMPT_VERSION as QA_PROMPT_VERSION, count_and_language

FUSED_VERSION = "fused-v1"  # bump on any change here (it is part of both stages' fingerprints when fused)
PROMPT_VERSION = f"{QA_PROMPT_VERSION}+{FUSED_VERSION}+{LAYOUT_VERSION}"  # written into each fused QA row
FUSED_MARKER = "Candidate task types to keep and write questions for:"
COLUMN = "fused_qa"  # the filter's extra column when fused: JSON {"qa": [...items...], "prompt_version": ...}


def job_text(candidates: Sequence[str], *, per_type: int, language: str) -> str:
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))
    return (f"Job FILTER+QA.\n{FUSED_MARKER}\n{listing}\n\n{count_and_language(per_type, language)}\n\n"
            "Reply with JSON only, in the form given above: the kept task types in task_types exactly as written "
            "(levels joined by ~) and, in qa, the questions and answers for every kept task type; two empty "
            "lists if none fits.")


def parse_fused(text: str) -> dict[str, list[Any]]:
    """``{"task_types": labels, "qa": raw items}``; ``ValueError`` (asked again) when either part is unreadable."""
    labels = parse_labels(text)
    return {"task_types": labels, "qa": parse_reply(text) if labels else []}


def build_request(image_id: str, image_path: str, candidates: list[str], filter_config: Any,
                  qa_config: Any) -> LLMRequest:
    return LLMRequest(
        key=image_id, prompt_version=PROMPT_VERSION, parse=parse_fused,
        messages=layout_messages(image_path, job_text(candidates, per_type=qa_config.questions_per_type,
                                                      language=qa_config.language)),
        json_schema=shared_schema() if qa_config.use_json_schema else None, schema_name=SCHEMA_NAME,
        max_tokens=qa_config.max_tokens, temperature=qa_config.temperature,
        prompt_cache_key=prompt_cache_key(image_id),
    )


def fused_cell(items: list[Any]) -> str:
    """The ``fused_qa`` value of one kept image."""
    return json.dumps({"qa": items, "prompt_version": PROMPT_VERSION}, ensure_ascii=False)


def read_cell(cell: str | None) -> tuple[list[Any], str]:
    """(raw items, prompt version) from a ``fused_qa`` value; ``ValueError`` when it is none."""
    if not cell:
        raise ValueError("the filter row has no fused_qa value (was the filter run with fuse_qa on?)")
    data = json.loads(cell)
    return list(data.get("qa") or []), str(data.get("prompt_version") or PROMPT_VERSION)


def fingerprint_parts(qa_config: Any) -> dict[str, Any]:
    """What a fused filter's output depends on besides its own config: the QA settings and prompt."""
    from processors.qa.prompt import SCHEMA_VERSION

    return {"fused": FUSED_VERSION, "layout": LAYOUT_VERSION, "qa_prompt_version": QA_PROMPT_VERSION,
            "qa_config": qa_config.model_dump(mode="json", exclude={"endpoint", "shard_size"}),
            "schema": "shared" if qa_config.use_json_schema else None, "qa_schema_version": SCHEMA_VERSION}
