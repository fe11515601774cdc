"""Parse a model's list of category names into clean child names, counting every rejected line by reason.

Rules, in the order they apply to each line:

1. blank lines, markdown fences (```` ``` ````, ``~~~``) and horizontal rules are layout, not content: skipped;
2. markdown headings and prose (a line ending in ``:``, a preamble such as "Here are...", a sentence of six
   or more words ending in ``.``/``!``/``?``) -> ``explanation``;
3. list markers (``1.``, ``2)``, ``(3)``, ``a)``, ``-``, ``*``, ``•``), markdown emphasis, backticks and
   surrounding quotes are stripped;
4. separators ``->``, ``→``, ``=>``, ``»``, `` > `` and every tilde look-alike become ``~``; ``/`` does too,
   and so does ``:``, but only when the text before the first one names the parent or an ancestor (so
   ``Yes/no questions`` stays a name and ``Scene text: Poster reading`` is a path);
5. a trailing description (``Name - what it is``, ``Name: what it is``, ``Name (e.g. ...)``) is cut off;
6. the segments are aligned with the parent path: a repeated parent prefix (up to and including the parent's
   name) is removed; nothing left -> ``repeats_parent``; more than one level left -> ``too_deep``; a prefix
   without the parent's name -> ``wrong_parent``; an empty level (``A~~B``), no letter, U+FFFD, an invisible
   or control character, markup (``<``, ``>``, ``{{``, ``}}``, ``{%``, ``%}``: an HTML tag or a template the
   model invented), or fewer than 3 letters / 40% letters (``~\ufffdJ\ufffd$0``) -> ``malformed``;
7. the name is cleaned (case, whitespace, trailing punctuation); over ``max_chars`` characters or
   ``max_words`` words -> ``too_long``; equal to an ancestor -> ``repeats_parent``; a second line with the
   same key in this reply -> ``duplicate``.

Duplicates of *existing* siblings, near-duplicates and the per-parent cap are decided later, against the
tree (``processors.taxonomy.merge``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from loaders.taxonomy.names import (SEPARATOR, clean_name, collapse, has_control_chars, name_key, name_problem,
                                    normalize_tildes)

PARSER_VERSION = "taxonomy-parser-v2"  # v2: names with U+FFFD, invisible characters or too few letters refused

_LAYOUT = re.compile(r"^(?:```.*|~~~.*|[-*_=]{3,})$")
_HEADING = re.compile(r"^#{1,6}\s")
_MARKER = re.compile(r"^(?:\(?\d{1,3}[.):]|\(?[a-zA-Z][.)]|[-*•·+–—▪►✓✔]|\[[ xX]?\])\s+")
_EMPHASIS = re.compile(r"\*\*|__|`")
_QUOTES = "\"'“”‘’«»「」"
_PREAMBLE = re.compile(
    r"^(?:here(?:'s| is| are)|sure|certainly|below|these|this is|the following|note|i |i'|okay|ok[,.]|"
    r"of course|let me|hope|feel free|absolutely|great)\b",
    re.IGNORECASE,
)
_ARROWS = re.compile(r"\s*(?:->|→|=>|»|⟶|\s>\s)\s*")
_DESCRIPTION = re.compile(r"\s+[-–—]\s+.*$|:\s+.*$|\s*\((?:e\.g\.|i\.e\.|(?:such as|for example|like)\b).*$", re.I)
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class Rejected:
    line: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ParsedReply:
    names: tuple[str, ...]
    rejected: tuple[Rejected, ...]


@dataclass(frozen=True)
class NameLimits:
    max_chars: int = 80
    max_words: int = 12


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def parse_reply(text: str, parent: Sequence[str], limits: NameLimits = NameLimits()) -> ParsedReply:
    """Parse a whole reply for children of ``parent`` (``()`` = first-level categories)."""
    parent_keys = tuple(name_key(p) for p in parent)
    names: list[str] = []
    seen: dict[str, str] = {}
    rejected: list[Rejected] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or _LAYOUT.match(line):
            continue
        try:
            name = parse_line(line, parent_keys, limits)
            key = name_key(name)
            if key in seen:
                raise _Reject("duplicate", f"same as {seen[key]!r} earlier in the reply")
        except _Reject as exc:
            rejected.append(Rejected(line, exc.reason, exc.detail))
            continue
        seen[key] = name
        names.append(name)
    return ParsedReply(tuple(names), tuple(rejected))


def parse_line(line: str, parent_keys: tuple[str, ...], limits: NameLimits) -> str:
    """One non-blank line -> a clean child name, or ``_Reject`` with a reason (rules 2-7)."""
    if _HEADING.match(line):
        raise _Reject("explanation", "markdown heading")
    text = _strip_decoration(line)
    if _is_prose(text):
        raise _Reject("explanation")
    if has_control_chars(text):
        raise _Reject("malformed", "control character")
    segments = _split_levels(text, parent_keys)
    name = _align(segments, parent_keys)
    if not _LETTER.search(name):
        raise _Reject("malformed", "no letters")
    problem = name_problem(name)
    if problem is not None:
        raise _Reject("malformed", problem)
    name = clean_name(name)
    if len(name) > limits.max_chars or len(name.split()) > limits.max_words:
        raise _Reject("too_long", f"{len(name)} characters, {len(name.split())} words")
    if name_key(name) in parent_keys:
        raise _Reject("repeats_parent", "names an ancestor")
    return name


def _strip_decoration(line: str) -> str:
    text = line
    for _ in range(3):  # "1. **"Name"**" peels in a few passes
        before = text
        text = _MARKER.sub("", text)
        text = _EMPHASIS.sub("", text).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES + ".,;":
            text = text.strip(_QUOTES + ".,; ")
        text = text.strip()
        if text == before:
            break
    return collapse(text)


def _is_prose(text: str) -> bool:
    words = len(text.split())
    if text.endswith(":"):
        return True
    if _PREAMBLE.match(text) and words >= 3:
        return True
    return text[-1:] in ".!?" and words >= 6


def _split_levels(text: str, parent_keys: tuple[str, ...]) -> list[str]:
    text = normalize_tildes(_ARROWS.sub(SEPARATOR, text))
    for separator in ("/", ":"):  # separators only when what precedes them names an ancestor
        if separator in text and SEPARATOR not in text and name_key(text.split(separator, 1)[0]) in parent_keys:
            text = text.replace(separator, SEPARATOR)
    text = _DESCRIPTION.sub("", text).strip()
    segments = [collapse(s).strip(" .;,") for s in text.split(SEPARATOR)]
    while segments and not segments[-1]:
        segments.pop()
    while segments and not segments[0]:
        segments.pop(0)
    if not segments or any(not s for s in segments):
        raise _Reject("malformed", "empty level")
    return segments


def _align(segments: list[str], parent_keys: tuple[str, ...]) -> str:
    """Drop a repeated parent prefix; the one segment left is the child's name.

    The prefix counts as the parent's when its last segment names the parent (the last such segment, so a
    child sharing its parent's name still aligns); the levels above it are not checked, because models
    abbreviate them ("OCR" for "Optical character recognition") and the parent is what decides placement.
    """
    keys = [name_key(s) for s in segments]
    if len(segments) == 1:
        rest = segments
    elif not parent_keys:
        raise _Reject("too_deep", "a first-level category must be a single name")
    else:
        hits = [i for i, key in enumerate(keys) if key == parent_keys[-1]]
        if not hits:
            raise _Reject("wrong_parent", f"prefix {SEPARATOR.join(segments[:-1])!r} is not the parent")
        rest = segments[hits[-1] + 1 :]
    if not rest:
        raise _Reject("repeats_parent", "only repeats the parent")
    if len(rest) > 1:
        raise _Reject("too_deep", f"{len(rest)} levels below the parent")
    return rest[0]


def parse_or_raise(text: str, parent: Sequence[str], limits: NameLimits) -> ParsedReply:
    """``parse_reply`` for ``LLMRequest.parse``: a reply with no list in it at all raises ``ValueError`` (retried).

    A reply whose lines were all rejected for other reasons is kept: the rejections are counted, and a retry
    of the same prompt would not be cheaper than recording them.
    """
    body = text.strip()
    if body.startswith("{"):  # a list was asked for; an object that does not even decode is a broken reply
        try:
            json.loads(body)
        except ValueError:
            raise ValueError(f"the reply starts as a JSON object but does not decode: {body[:120]!r}") from None
    parsed = parse_reply(text, parent, limits)
    if not parsed.names and all(r.reason == "explanation" for r in parsed.rejected):
        raise ValueError(f"no list of names in the reply ({len(parsed.rejected)} lines of prose)")
    return parsed
