"""Task-type labels as models write them back: normalisation and matching to the candidates.

A label matches a candidate when both normalise to the same text: case folded, whitespace collapsed, odd
tildes (``∼``, ``〜``, ``～``) and spaced separators unified to ``~``, surrounding quotes and punctuation removed.
A label may also be the candidate's number in the prompt's list ("3"), or its leaf alone when that leaf is
unique among the candidates (models often drop the parent prefix).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

TILDES = re.compile(r"\s*[~∼〜～]\s*")
SPACES = re.compile(r"\s+")
EDGE = "\"'“”‘’`«»[](){}.,;:*- \t\n"


def normalise_label(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text))
    text = TILDES.sub("~", text)
    return SPACES.sub(" ", text).strip(EDGE).casefold()


class CandidateIndex:
    """Looks up a written label among one image's candidates."""

    def __init__(self, candidates: Sequence[str]):
        self.candidates = list(candidates)
        self._full = {normalise_label(c): c for c in self.candidates}
        leaves: dict[str, list[str]] = {}
        for candidate in self.candidates:
            leaves.setdefault(normalise_label(candidate.split("~")[-1]), []).append(candidate)
        self._leaf = {leaf: found[0] for leaf, found in leaves.items() if len(found) == 1}

    def lookup(self, label: str) -> str | None:
        key = normalise_label(label)
        if key.isdigit() and 1 <= int(key) <= len(self.candidates):
            return self.candidates[int(key) - 1]
        return self._full.get(key) or self._leaf.get(key)


def match_labels(labels: Sequence[str], index: CandidateIndex) -> tuple[list[str], list[str]]:
    """(kept candidates in reply order without repeats, labels that match no candidate).

    Consecutive unmatched pieces are tried joined with ", " first: an unquoted bracketed list splits a label
    that itself holds a comma ("Charts, tables~Reading values") into two pieces.
    """
    kept: list[str] = []
    rejected: list[str] = []
    i = 0
    while i < len(labels):
        found, used = index.lookup(labels[i]), 1
        if found is None:
            for j in range(i + 2, min(len(labels), i + 4) + 1):
                joined = index.lookup(", ".join(labels[i:j]))
                if joined is not None:
                    found, used = joined, j - i
                    break
        if found is None:
            if normalise_label(labels[i]):
                rejected.append(labels[i])
        elif found not in kept:
            kept.append(found)
        i += used
    return kept, rejected
