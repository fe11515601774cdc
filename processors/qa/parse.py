"""Reading a QA reply in whatever JSON shape it came, without judging the items (``validate`` does that).

Accepted shapes, tried in this order on the text inside code fences (all of them, concatenated) and then on
the whole text:

- one JSON value: an object wrapping an array (``{"qa": [...]}``, the json_schema shape, or any other key
  whose value is an array of objects, also one level deeper), a bare array, or a single QA object;
- several JSON values one after another (line-delimited JSON, or pretty-printed objects in a row), possibly
  with prose around them; each is unwrapped as above and the items are concatenated;
- the same with trailing commas (``[{...},]``) removed, a common slip.

A text that itself starts as JSON but does not decode (cut off, or broken in the middle) is not mined for the
objects that happen to decode: that reply is asked again (or repaired), because its pieces depend on where it
broke and a retry gives the whole answer.

``parse_reply`` raises ``ValueError`` only when no array of objects (nor a QA-shaped object, nor an empty
array meaning "no questions") can be found at all: that is the one verdict the engine's retry loop and the
repair turn act on. Items that are not objects are passed on, so that validation records each as an item
failure rather than failing the whole reply.
"""

from __future__ import annotations

import json
import re
from typing import Any

FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)
TRAILING_COMMA = re.compile(r",\s*([\]}])")
WRAPPER_KEYS = ("qa", "qas", "qa_pairs", "items", "questions", "pairs", "data", "results", "output")
QA_KEYS = frozenset({"question", "answer", "task_type", "q", "a"})
JSON_START = re.compile(r"[\[{]")
MAX_SCAN_STARTS = 400  # decode attempts per text: bounds the cost of scanning long garbage


def parse_reply(text: str) -> list[Any]:
    """The raw items of a reply (usually dicts); ``ValueError`` when the reply holds no QA-shaped JSON."""
    text = (text or "").strip().lstrip("\ufeff")
    if not text:
        raise ValueError("the reply is empty")
    blocks = FENCE.findall(text)
    candidates = ["\n".join(blocks)] if blocks else []
    candidates.append(text)
    for candidate in candidates:
        for variant in (candidate, TRAILING_COMMA.sub(r"\1", candidate)):
            items = items_in(variant)
            if items is not None:
                return items
    raise ValueError(f"no JSON array of question-answer objects found in the reply: {text[:120]!r}")


def items_in(text: str) -> list[Any] | None:
    """Items of every JSON value found in ``text`` (whole, or embedded one after another); None if none."""
    text = text.strip()
    try:
        values = [json.loads(text)]
    except ValueError:
        try:
            values = list(_embedded_values(text, whole_document=bool(JSON_START.match(text))))
        except ValueError:  # a broken document: the caller may try a repaired variant, else asks again
            return None
    found: list[Any] | None = None
    for value in values:
        items = unwrap(value)
        if items is not None:
            found = (found or []) + items
    return found


def unwrap(value: Any, depth: int = 0) -> list[Any] | None:
    """The item list inside one decoded JSON value, or None when it does not look like QA output."""
    if isinstance(value, list):  # [] is a real answer (nothing); a list of bare strings is not QA output
        return value if not value or any(isinstance(v, dict) for v in value) else None
    if not isinstance(value, dict):
        return None
    if QA_KEYS & {str(k).strip().casefold() for k in value}:
        return [value]
    keyed = {str(k).strip().casefold(): v for k, v in value.items()}
    known = [keyed[k] for k in WRAPPER_KEYS if k in keyed]
    if any(inner == [] for inner in known):
        return []
    for inner in known + list(value.values()):
        if isinstance(inner, list) and any(isinstance(v, dict) for v in inner):
            return inner
    if depth == 0:
        for inner in value.values():
            items = unwrap(inner, depth + 1) if isinstance(inner, dict) else None
            if items is not None:
                return items
    return None


def _embedded_values(text: str, *, whole_document: bool = False):
    """JSON values that start at a ``[`` or ``{`` in ``text``, left to right, not overlapping.

    With ``whole_document`` (the text itself starts as JSON) a value must begin where the previous one ended
    (only whitespace between): a broken or truncated document (``{"oops": {"qa": [...]} ,,``) is not mined
    for the pieces that happen to decode, it is a reply to ask again."""
    decoder = json.JSONDecoder()
    position, attempts = 0, 0
    while attempts < MAX_SCAN_STARTS:
        match = JSON_START.search(text, position)
        if match is None:
            return
        if whole_document and text[position:match.start()].strip():
            raise ValueError(f"the reply starts as JSON but does not decode: {text[:120]!r}")
        attempts += 1
        try:
            value, end = decoder.raw_decode(text, match.start())
        except ValueError:
            if whole_document:
                raise ValueError(f"the reply starts as JSON but does not decode: {text[:120]!r}") from None
            position = match.start() + 1
            continue
        yield value
        position = end
