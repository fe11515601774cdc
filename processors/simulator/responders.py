"""How the simulator answers: the ordered list of responders it was built with, then a generic default.

The simulator knows no stage: whoever starts it hands it its responders (``SimulatorThread(options,
responders=...)``). The product's list is composed in ``processors/pipeline.py`` (``default_responders``, one
per LLM stage, in pipeline order), which ``--dry-run`` and ``taskgalaxy simulate-api`` pass down; a test passes
its own. The first responder whose ``matches(messages)`` is true writes the reply text with
``respond(messages, rng)``; ``rng`` is a ``random.Random`` seeded from the request, so the same request always
gets the same reply. No responder matching: ``default_reply``.

Example, in ``processors/filter/simulate.py``::

    SIM_RESPONDER = Responder("filter", matches=lambda m: "FILTER-V1" in m[0]["content"],
                              respond=lambda m, rng: "[OCR~Scene text]")

and in ``processors.pipeline.default_responders``: ``from processors.filter.simulate import SIM_RESPONDER``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Responder:
    name: str
    matches: Callable[[Messages], bool]
    respond: Callable[[Messages, random.Random], str]


def checked(responders: Iterable[Responder]) -> tuple[Responder, ...]:
    """``responders`` as a tuple; a ``TypeError`` names any entry that is not a ``Responder`` (a module path
    string, say), at construction rather than on the first request."""
    entries = tuple(responders)
    for entry in entries:
        if not isinstance(entry, Responder):
            raise TypeError(f"simulator responder {entry!r} is not a Responder")
    return entries


def message_text(messages: Messages) -> str:
    """All text of a conversation, image parts left out: what responders usually match on."""
    chunks = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chunks.append(content)
        elif isinstance(content, list):
            chunks.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(chunks)


def from_schema(schema: dict[str, Any], rng: random.Random, depth: int = 0) -> Any:
    """A small instance of a JSON schema (objects, arrays, enums, scalars) for the default reply."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        return {name: from_schema(sub, rng, depth + 1) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [from_schema(schema.get("items", {}), rng, depth + 1) for _ in range(1 if depth else 2)]
    if kind == "integer":
        return rng.randint(0, 9)
    if kind == "number":
        return round(rng.random(), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    return f"sim-{rng.getrandbits(32):08x}"


def default_reply(body: dict[str, Any], rng: random.Random) -> str:
    """No responder matched: an instance of the requested JSON schema, a JSON object if the prompt asks for
    JSON, else a sentence."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return json.dumps(from_schema(response_format["json_schema"].get("schema", {}), rng))
    if response_format.get("type") == "json_object" or "json" in message_text(body["messages"]).lower():
        return json.dumps({"answer": f"sim-{rng.getrandbits(32):08x}"})
    return f"Simulated answer {rng.getrandbits(32):08x}."


def reply_text(responders: Sequence[Responder], body: dict[str, Any], rng: random.Random) -> str:
    messages = body["messages"]
    for responder in responders:
        if responder.matches(messages):
            return responder.respond(messages, rng)
    return default_reply(body, rng)
