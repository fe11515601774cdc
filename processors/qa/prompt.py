"""The QA prompt (our own wording of the paper's step 4) and the one follow-up turn that asks for a repair.

The image's task types are listed with their full paths, one per line after ``MARKER``; the reply is asked
for as ``{"qa": [{"task_type", "question", "answer"}, ...]}``. With ``json_schema`` the ``task_type`` strings
are an ``enum`` of the image's types, so a structured-output endpoint cannot invent one. The simulator's
responder (``processors.qa.simulate``) reads the listing and the count back from this text, so change the
two together. Bump ``PROMPT_VERSION`` (or ``REPAIR_VERSION``) on any change: both are part of cache keys
and the stage fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from processors.prompt_layout import layout_messages

PROMPT_VERSION = "qa-v1"
# The structured-output schema, apart: it is part of the request (and so of its cache key) only when a
# schema is sent, so only the stage fingerprint needs it (v2: exactly as many items as questions wanted).
SCHEMA_VERSION = "qa-schema-v2"
REPAIR_VERSION = "qa-repair-v1"
MARKER = "Task types to write questions for (levels joined by ~):"
COUNT_PHRASE = "question(s) per task type:"
REPAIR_MARKER = "Your previous reply could not be read as JSON."
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}

SYSTEM = (
    "You write training data for a vision-language assistant. You are shown one image and a list of task "
    "types, each a skill written as a path from a broad area to a specific ability. For every task type you "
    "write questions about this very image that cannot be answered without exercising that skill, and a "
    "correct, complete answer to each."
)

RULES = (
    "Rules:\n"
    "- Each question must need the skill its task type names and must be answerable from the image alone.\n"
    "- Prefer questions that take several steps of looking or reasoning over ones a single glance answers.\n"
    "- Each answer must be correct and complete: where it helps, explain briefly how the image shows it, "
    "then state the result.\n"
    "- Do not name the task type inside the question, and do not ask the same thing twice.\n"
    "- Copy every task_type exactly as listed above."
)

REPLY_SHAPE = '{"qa": [{"task_type": "...", "question": "...", "answer": "..."}]}'


def build_messages(image_path: str, task_types: Sequence[str], *, per_type: int, language: str) -> list[dict[str, Any]]:
    """The chat messages of one QA request: system instructions, then the image and the task listing."""
    listing = "\n".join(f"- {t}" for t in task_types)
    language_rule = (f"\n- Write every question and answer in {LANGUAGE_NAMES[language]}."
                     if language in LANGUAGE_NAMES else "")
    text = (
        f"{MARKER}\n{listing}\n\n"
        f"Number of {COUNT_PHRASE} {per_type}\n\n"
        f"{RULES}{language_rule}\n\n"
        f"Reply with JSON only, in this form: {REPLY_SHAPE}"
    )
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image_path", "path": image_path}, {"type": "text", "text": text}]},
    ]


def count_and_language(per_type: int, language: str) -> str:
    """The count line (read back by the simulator) and, where one is asked for, the language line."""
    language_line = (f"\nWrite every question and answer in {LANGUAGE_NAMES[language]}."
                     if language in LANGUAGE_NAMES else "")
    return f"Number of {COUNT_PHRASE} {per_type}{language_line}"


def build_layout_messages(image_path: str, task_types: Sequence[str], *, per_type: int,
                          language: str) -> list[dict[str, Any]]:
    """A QA request under ``prompt_layout: cache_friendly``: the preamble shared with the filter request (rules
    and reply shape included), the image, then only what varies (``processors.prompt_layout``)."""
    listing = "\n".join(f"- {t}" for t in task_types)
    text = (f"Job QA.\n{MARKER}\n{listing}\n\n{count_and_language(per_type, language)}\n\n"
            "Reply with JSON only, in the form given above: an empty task_types list and the questions and "
            "answers in qa.")
    return layout_messages(image_path, text)


def repair_messages(messages: list[dict[str, Any]], bad_reply: str) -> list[dict[str, Any]]:
    """The original conversation, the reply that did not parse, and one turn asking for it as valid JSON.

    The image stays in the conversation (a follow-up turn, as a chat would have it), so a reply that was
    garbage rather than merely mis-formatted can still be written anew.
    """
    ask = (
        f"{REPAIR_MARKER} Send the same questions and answers again as JSON only, exactly in this form: "
        f"{REPLY_SHAPE} — no code fences, no comments, no text before or after it."
    )
    return [*messages, {"role": "assistant", "content": bad_reply}, {"role": "user", "content": ask}]


def json_schema(task_types: Sequence[str], count: int | None = None) -> dict[str, Any]:
    """The reply's structured-output schema; ``task_type`` is limited to this image's types and, with
    ``count``, the list to exactly that many items (a weak open model under a grammar otherwise closes it
    empty: seen on vLLM with a random-weight model, every reply ``{"qa": []}``)."""
    item = {
        "type": "object",
        "properties": {
            "task_type": {"type": "string", "enum": list(task_types)},
            "question": {"type": "string"},
            "answer": {"type": "string"},
        },
        "required": ["task_type", "question", "answer"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"qa": {"type": "array", "items": item,
                              **({"minItems": count, "maxItems": count} if count else {})}},
        "required": ["qa"],
        "additionalProperties": False,
    }
