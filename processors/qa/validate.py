"""Judging the items of one parsed QA reply: which become rows, which become item failures and why.

Per item, in this order (the first rule broken is the reason recorded):

``malformed_item``  not a JSON object;
``missing_field``   no string-like ``task_type``/``question``/``answer`` (common aliases such as ``type``,
                    ``label``, ``q``, ``a`` are accepted);
``label_not_in_types`` the task type is none of the image's kept types. Labels are compared after
                    normalisation: NFKC, odd tildes (``∼``, ``〜``, ``～``...) as ``~``, whitespace around
                    and inside each level collapsed, case folded, surrounding quotes dropped. A bare leaf
                    name is accepted when it is unique among the image's types;
``empty_question`` / ``empty_answer``  nothing left after trimming debris ("Question:", "A:" prefixes);
``question_length`` / ``answer_length``  outside the configured bounds (characters);
``wrong_language``  the configured language's script covers less than ``min_language_share`` of the
                    question + answer text — a cheap heuristic, not a language detector: for ``en`` the
                    share of ASCII letters among all letters, for ``zh`` the share of CJK ideographs among
                    ideographs + Latin words; texts with under 4 letters are not judged;
``duplicate_question`` the same question (case, spacing and end punctuation ignored) earlier in the reply,
                    under any task type;
``over_quota``      more than ``questions_per_type`` valid questions for one type (the first ones are kept).

Question and answer lose ANSI escape sequences and control characters (all but newline and tab) before
they are judged (``strip_control``): terminal debris is not text, and a kept row carries none of it.

Afterwards, when the reply held fewer items than it was asked for (types x questions_per_type), each
missing one is a ``missing_question`` failure named by its task type: every slot asked for ends up as a
row or a failure, while an invalid item that stood in for a slot is counted once, not twice.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from processors.qa.config import QAConfig

VALIDATE_VERSION = "1"  # bump when a rule changes which items are kept
TILDES = re.compile(r"\s*[~\u223c\u301c\uff5e\u2053\u02dc]\s*")
SPACES = re.compile(r"\s+")
EDGE = "\"'“”‘’`«»*[]() \t\n"
PREFIX = {
    "question": re.compile(r"^(?:\*\*)?(?:q|question)\s*\d*\s*[:：.)-]\s*(?:\*\*)?\s*", re.IGNORECASE),
    "answer": re.compile(r"^(?:\*\*)?(?:a|answer)\s*\d*\s*[:：.)-]\s*(?:\*\*)?\s*", re.IGNORECASE),
}
ALIASES = {
    "task_type": ("task_type", "tasktype", "task type", "task-type", "type", "label", "task", "category"),
    "question": ("question", "q", "query"),
    "answer": ("answer", "a", "response"),
}
# Terminal debris in model text: ANSI escape sequences (CSI ``ESC [ ... m``, OSC ``ESC ] ... BEL`` or
# ``ESC \\``, any other ``ESC [intermediates] x``), then every other control character but newline and
# tab (C0, DEL, C1, NUL included) and lone surrogates (a JSON ``\\ud800`` decodes to one; no file can
# encode it). None of it is part of a question or an answer, and all of it would reach the LLaVA JSON, the
# sample browser and terminals that print a sample.
ANSI_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]?")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")
MIN_LETTERS_JUDGED = 4
ITEM_CHARS = 200


@dataclass(frozen=True)
class QA:
    task_type: str  # the image's kept type, exactly as the filter stage wrote it
    question: str
    answer: str


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str
    item: str  # what was rejected, short: "task type | question"


def label_key(text: str) -> str:
    """The comparison form of a task-type label (see the module docstring)."""
    text = unicodedata.normalize("NFKC", str(text))
    text = SPACES.sub(" ", TILDES.sub("~", text)).strip(EDGE + ".,;:")
    return text.casefold()


class TypeIndex:
    """Finds a written label among one image's kept task types."""

    def __init__(self, task_types: Sequence[str]):
        self.task_types = list(dict.fromkeys(task_types))
        self._full = {label_key(t): t for t in self.task_types}
        leaves = Counter(label_key(t.split("~")[-1]) for t in self.task_types)
        self._leaf = {label_key(t.split("~")[-1]): t for t in self.task_types
                      if leaves[label_key(t.split("~")[-1])] == 1}

    def lookup(self, label: str) -> str | None:
        key = label_key(label)
        return self._full.get(key) or self._leaf.get(key)


def strip_control(text: str) -> str:
    """``text`` without ANSI escape sequences and control characters (newline and tab are kept)."""
    return CONTROL_CHARS.sub("", ANSI_SEQUENCE.sub("", text))


def clean_text(text: str, kind: str) -> str:
    """Drop control characters and escape sequences, then trim whitespace and the "Question:"/"A:" debris
    models put in front of a field."""
    text = unicodedata.normalize("NFC", strip_control(text)).strip()
    return PREFIX[kind].sub("", text, count=1).strip()


def language_share(text: str, language: str) -> float | None:
    """Share of ``text`` written in ``language``'s script; None when there is too little to judge."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) < MIN_LETTERS_JUDGED or language == "any":
        return None
    if language == "en":
        return sum(c.isascii() for c in letters) / len(letters)
    cjk = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    words = len(LATIN_WORD.findall(text))
    return cjk / (cjk + words) if cjk + words else 0.0


def _field(item: dict[str, Any], name: str) -> str | None:
    keyed = {str(k).strip().casefold(): v for k, v in item.items()}
    for alias in ALIASES[name]:
        value = keyed.get(alias)
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return None


def _describe(item: Any) -> str:
    if isinstance(item, dict):
        parts = [_field(item, "task_type") or "?", _field(item, "question") or "?"]
        return strip_control(" | ".join(p.strip() for p in parts))[:ITEM_CHARS]
    return repr(item)[:ITEM_CHARS]  # repr shows control characters as escapes


def question_key(question: str) -> str:
    return SPACES.sub(" ", question.casefold()).strip(" ?.!。？！")


def check_item(item: Any, index: TypeIndex, config: QAConfig) -> QA | Rejected:
    """One item on its own (everything but duplicates and quotas, which need the whole reply)."""
    if not isinstance(item, dict):
        return Rejected("malformed_item", f"expected a JSON object, got {type(item).__name__}", _describe(item))
    label, question, answer = (_field(item, n) for n in ("task_type", "question", "answer"))
    missing = [n for n, v in (("task_type", label), ("question", question), ("answer", answer)) if v is None]
    if missing:
        return Rejected("missing_field", f"no {', '.join(missing)} in {sorted(map(str, item))}", _describe(item))
    task_type = index.lookup(label)
    if task_type is None:
        return Rejected("label_not_in_types", f"{label!r} is none of the image's {len(index.task_types)} task types",
                        _describe(item))
    question, answer = clean_text(question, "question"), clean_text(answer, "answer")
    for kind, text in (("question", question), ("answer", answer)):
        low, high = getattr(config, f"min_{kind}_chars"), getattr(config, f"max_{kind}_chars")
        if not text:
            return Rejected(f"empty_{kind}", f"the {kind} is empty", _describe(item))
        if not low <= len(text) <= high:
            return Rejected(f"{kind}_length", f"{len(text)} characters, allowed {low}..{high}", _describe(item))
    share = language_share(f"{question} {answer}", config.language)
    if share is not None and share < config.min_language_share:
        return Rejected("wrong_language", f"{share:.0%} of the text is in the script of {config.language!r}, "
                        f"need {config.min_language_share:.0%}", _describe(item))
    return QA(task_type, question, answer)


def validate_items(items: Sequence[Any], task_types: Sequence[str],
                   config: QAConfig) -> tuple[list[QA], list[Rejected]]:
    """(accepted QAs in reply order, rejected items with reasons) for one image's reply."""
    index = TypeIndex(task_types)
    accepted: list[QA] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    per_type: Counter = Counter()
    for item in items:
        verdict = check_item(item, index, config)
        if isinstance(verdict, QA):
            if question_key(verdict.question) in seen:
                verdict = Rejected("duplicate_question", "the same question came earlier in this reply",
                                   _describe(item))
            elif per_type[verdict.task_type] >= config.questions_per_type:
                verdict = Rejected("over_quota", f"more than {config.questions_per_type} question(s) for this type",
                                   _describe(item))
        if isinstance(verdict, Rejected):
            rejected.append(verdict)
            continue
        seen.add(question_key(verdict.question))
        per_type[verdict.task_type] += 1
        accepted.append(verdict)
    rejected.extend(_shortfall(len(items), index.task_types, per_type, config.questions_per_type))
    return accepted, rejected


def _shortfall(given: int, task_types: list[str], per_type: Counter, quota: int) -> list[Rejected]:
    """``missing_question`` for each slot the reply did not even attempt, charged to the emptiest types."""
    missing = quota * len(task_types) - given
    counts = Counter(per_type)
    out: list[Rejected] = []
    while missing > 0 and task_types:
        task_type = min(task_types, key=counts.__getitem__)  # the first of the emptiest, in listing order
        if counts[task_type] >= quota:
            break
        counts[task_type] += 1
        missing -= 1
        out.append(Rejected("missing_question", "the reply gave fewer questions than asked", task_type[:ITEM_CHARS]))
    return out
