"""Reading a filter reply into the list of labels it names, whatever shape the model chose.

Accepted: ``{"task_types": [...]}``, a JSON array, the paper's bracketed list with or without quotes
(straight or curly), one label per line, and ``None``/``[]``/"none of them" for an empty answer. A reply
that is none of these raises ``ValueError`` — inside the engine's retry loop, so it is asked again and,
after the retries, recorded as ``unparsable`` with its text. Whether each label is a real candidate is
decided afterwards (``labels.CandidateIndex``), so one invented label never costs a whole new request.
"""

from __future__ import annotations

import json
import re

FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
EMPTY = re.compile(r"^\s*(none|null|\[\s*\]|no (task types? )?(fit|match|apply)\w*|none of (them|the above))\W*$", re.I)
CURLY = str.maketrans({"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'"})
BRACKETS = re.compile(r"\[(.*)\]", re.S)
LIST_MARK = re.compile(r"^(?:[-*•]|\d+[.)])\s*")
LIST_ENTRY = re.compile(r"^(?:[-*•]|\d+[.)])\s*\S|^[^~\n]+(?:\s*[~∼〜～]\s*[^~\n]+)+$")


def parse_labels(text: str) -> list[str]:
    body = FENCE.sub("", text.strip()).strip()
    if EMPTY.match(body):
        return []
    value = _json(body)
    if value is not None:
        return value
    if body.startswith("{"):  # an object that does not decode is broken JSON, not a bracketed list inside prose
        raise ValueError(f"the reply starts as a JSON object but does not decode: {body[:120]!r}")
    match = BRACKETS.search(body)
    if match:
        inner = match.group(1).strip()
        return [] if not inner else _split_items(inner)
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    # One label per line only when every line looks like a list entry (a bullet, a number or a path with
    # `~`): a sentence of prose ("I cannot help with that.") is not a label, it is a reply to ask again.
    if 1 <= len(lines) <= 50 and all(len(line) <= 200 and LIST_ENTRY.match(line) for line in lines):
        return [LIST_MARK.sub("", line) for line in lines]
    raise ValueError(f"not a list of task types: {body[:120]!r}")


def _json(body: str) -> list[str] | None:
    for candidate in (body, body.translate(CURLY)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            if not {"task_types", "labels"} & value.keys():
                raise ValueError(f"JSON reply has no 'task_types' key: {body[:120]!r}")
            value = value.get("task_types", value.get("labels"))
        if value is None:
            return []
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            return [str(v) for v in value]
        raise ValueError(f"JSON reply is not a list of task types: {body[:120]!r}")
    return None


def _split_items(inner: str) -> list[str]:
    """Quoted items keep their commas; unquoted ones split on commas."""
    inner = inner.translate(CURLY)
    quoted = re.findall(r'"([^"]*)"|\'([^\']*)\'', inner)
    if quoted:
        return [a or b for a, b in quoted]
    return [item.strip() for item in inner.split(",") if item.strip()]
