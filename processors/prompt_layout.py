"""The cache-friendly prompt layout (``prompt_layout: cache_friendly`` on ``stages.filter`` and ``stages.qa``).

OpenAI's prompt cache serves the longest prefix of a request that a recent request sent word for word (at
least 1,024 tokens, in steps of 128), and a structured-output schema counts as the start of that prefix. The
paper layout gives the filter and the QA request different system messages and schemas holding per-image
``enum``s, so no two requests share a token. Under this layout every request of the filter, the QA step and
the fused step (``stages.qa.fuse_filter``) is, in order:

1. the schema ``SHARED_SCHEMA`` (no per-image enum, no per-image item count: one schema for all three);
2. the system message ``PREAMBLE``, identical word for word in all three;
3. the user message: the image first, then one text part with what varies (candidates, task types, counts).

So an image's QA request finds the preamble and the image in the cache its filter request left (at
``image_detail: high`` that is 1,152 cached tokens of ~1,310), and every request finds the schema and the
preamble (under 1,024 tokens alone: never billed as cached by itself). Labels are checked after parsing
instead of by the schema: the filter's ``label_not_in_candidates``, the QA step's ``label_not_in_types``.
``prompt_cache_key`` is the image id, so an image's requests meet the same cache machine where the endpoint
accepts the field (``send_prompt_cache_key``). Bump ``LAYOUT_VERSION`` on any change here.
"""

from __future__ import annotations

from typing import Any, Literal

PromptLayout = Literal["paper", "cache_friendly"]
LAYOUT_VERSION = "cache-friendly-v1"  # part of the prompt version and fingerprint of every request using it
SCHEMA_NAME = "taskgalaxy_reply"

PREAMBLE = (
    "You build a visual instruction-tuning dataset. Each request shows you one image and then gives you one of "
    "three jobs, stated after the image.\n\n"
    "Task types are skills written as paths from a broad area to a specific ability, levels joined by ~ "
    "(for example OCR~Scene text~Street sign reading).\n\n"
    "Job FILTER: you get numbered candidate task types. Keep only the task types that can genuinely be carried "
    "out on this particular image: the image must contain what the task needs (text for reading tasks, a chart "
    "for chart tasks, several objects for counting, and so on). Reject task types that merely relate to the "
    "topic. Write the kept ones in task_types exactly as listed and leave qa empty.\n\n"
    "Job QA: you get the task types to write questions for. For every task type write the requested number of "
    "questions about this very image that cannot be answered without exercising that skill, each with a "
    "correct, complete answer, in qa; leave task_types empty.\n\n"
    "Job FILTER+QA: you get numbered candidate task types. First keep the fitting ones as in FILTER (in "
    "task_types), then write the questions and answers for every kept task type as in QA (in qa).\n\n"
    "Rules for questions and answers:\n"
    "- Each question must need the skill its task type names and must be answerable from the image alone.\n"
    "- Prefer questions that take several steps of looking or reasoning over ones a single glance answers.\n"
    "- Each answer must be correct and complete: where it helps, explain briefly how the image shows it, then "
    "state the result.\n"
    "- Do not name the task type inside the question, and do not ask the same thing twice.\n"
    "- Copy every task_type exactly as listed in the job.\n\n"
    'Reply with JSON only, in this form: {"task_types": ["..."], "qa": [{"task_type": "...", "question": '
    '"...", "answer": "..."}]} with an empty list for a part the job does not ask for.'
)

SHARED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task_types": {"type": "array", "items": {"type": "string"}},
        "qa": {"type": "array", "items": {
            "type": "object",
            "properties": {"task_type": {"type": "string"}, "question": {"type": "string"},
                           "answer": {"type": "string"}},
            "required": ["task_type", "question", "answer"],
            "additionalProperties": False,
        }},
    },
    "required": ["task_types", "qa"],
    "additionalProperties": False,
}


def layout_messages(image_path: str, job_text: str) -> list[dict[str, Any]]:
    """The messages of one request under the layout: the shared preamble, then the image, then the job."""
    return [
        {"role": "system", "content": PREAMBLE},
        {"role": "user", "content": [{"type": "image_path", "path": image_path}, {"type": "text", "text": job_text}]},
    ]


def shared_schema() -> dict[str, Any]:
    """A copy of ``SHARED_SCHEMA`` (a request may be mutated downstream; the constant must not be)."""
    import copy

    return copy.deepcopy(SHARED_SCHEMA)


def prompt_cache_key(image_id: str) -> str:
    """The ``prompt_cache_key`` of an image's requests (sent only where ``send_prompt_cache_key`` is on)."""
    return f"tg-{image_id}"[:64]


def layout_parts(layout: str) -> dict[str, Any]:
    """What the layout adds to a stage's fingerprint: nothing under ``paper`` (the fingerprint stays put)."""
    return {} if layout == "paper" else {"prompt_layout": LAYOUT_VERSION}
