"""The filter prompt: our own wording of step 3's second half (GPT-4o keeps the candidates that truly fit).

The candidates are numbered so a model may answer with numbers; the reply is a JSON object
``{"task_types": [...]}`` — with ``json_schema`` the allowed strings are the candidates themselves (an
``enum``), so a structured-output endpoint cannot invent a label. Bump PROMPT_VERSION on any change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from processors.prompt_layout import layout_messages

PROMPT_VERSION = "filter-v1"
# The structured-output schema, apart: it is part of the request (and so of its cache key) only when a
# schema is sent, so only the stage fingerprint needs it (v2: the list is capped at the candidates).
SCHEMA_VERSION = "filter-schema-v2"
MARKER = "Candidate task types for this image:"

SYSTEM = (
    "You curate a visual instruction-tuning dataset. For an image and a list of candidate task types, you "
    "keep only the task types that can genuinely be carried out on this particular image: the image must "
    "contain what the task needs (text for reading tasks, a chart for chart tasks, several objects for "
    "counting, and so on). Reject task types that merely relate to the topic."
)


def build_messages(image_path: str, candidates: Sequence[str]) -> list[dict[str, Any]]:
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))
    instructions = (
        f"{MARKER}\n{listing}\n\n"
        "Reply with JSON only: {\"task_types\": [...]} listing the fitting task types exactly as written "
        "above (levels joined by ~). Use an empty list if none fits."
    )
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image_path", "path": image_path}, {"type": "text", "text": instructions}]},
    ]


def layout_job(candidates: Sequence[str]) -> str:
    """The varying part of a filter request under ``prompt_layout: cache_friendly`` (after the image)."""
    listing = "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, 1))
    return (f"Job FILTER.\n{MARKER}\n{listing}\n\nReply with JSON only, in the form given above: the fitting task "
            "types in task_types exactly as written (levels joined by ~) and an empty qa list; an empty "
            "task_types list if none fits.")


def build_layout_messages(image_path: str, candidates: Sequence[str]) -> list[dict[str, Any]]:
    """A filter request under the cache-friendly layout (``processors.prompt_layout``)."""
    return layout_messages(image_path, layout_job(candidates))


def json_schema(candidates: Sequence[str]) -> dict[str, Any]:
    """The reply's structured-output schema: a list of the candidates, at most as long as there are of them
    (under a grammar, a weak open model otherwise repeats one label until max_tokens: seen on vLLM)."""
    items = {"type": "string", "enum": list(candidates)}
    return {
        "type": "object",
        "properties": {"task_types": {"type": "array", "items": items, "maxItems": len(candidates)}},
        "required": ["task_types"],
        "additionalProperties": False,
    }
