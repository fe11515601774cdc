"""The vision-dependency ("blind") check: a text-only model answers the question without the image.

The model gets the question alone — no image, no task type, no proposed answer — and answers it. Its answer
is then compared with the sample's own (``answers_agree``); the vote is 1 when they agree: the question is
answerable without the image, and a question a model answers without looking teaches no vision. The final
stage names such a referee in ``blind_referees``: its vote does not count toward the threshold, and a 1 fails
the sample as ``answerable_without_image``.

How answers are compared (after ``normalise``: case folded, punctuation, articles and an "the answer is"
prefix dropped):

- multiple choice (the question lists options "A. ...", "(B) ..."; or the sample's answer is an option
  letter): the option letters must be equal;
- short answers (at most ``SHORT_WORDS`` words on either side): equal, or one contained in the other as whole
  words ("42" and "the sum is 42");
- otherwise token F1 at least ``F1_THRESHOLD``.

A reply of "unknown" (what the prompt asks for when the image is needed) never agrees.

``p_yes`` holds the agreement (1.0 / 0.0 for the first two rules, the F1 for the third), so the final stage
can apply another F1 threshold without asking again (``stages.final.blind_f1_threshold``).

Settings: a referee with ``blind: true`` and ``see_answer: true`` (the answer is needed for the comparison,
never sent) on an endpoint serving any text model.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from processors.referees.endpoint import EndpointReferee, unfenced
from processors.referees.prompt import BLIND_PROMPT_VERSION
from processors.referees.protocol import RefereeItem, Vote

__all__ = ["BLIND_PROMPT_VERSION", "BlindReferee", "answers_agree"]
BLIND_INSTRUCTION = (
    "Answer the question below. There is an image that goes with it, but you cannot see it: answer from the "
    "text alone and your general knowledge, as briefly as possible (a word, a number or an option letter). "
    "If the question cannot be answered without seeing the image, reply exactly: unknown"
)
BLIND_MAX_TOKENS = 48
SHORT_WORDS = 5
F1_THRESHOLD = 0.5

_OPTION = re.compile(r"(?:^|\n|\s)\(?([A-H])[.):]\s+\S")
# An option letter at the start of an answer ("B", "(B)", "B. a cat", "Answer: B"); the letter in capitals (a
# lower-case "a" is an article) unless a bracket or full stop marks it.
_LETTER_ANSWER = re.compile(r"^\s*(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*[:\-]?\s*)?"
                            r"(?:\(([A-Ha-h])\)|([A-Ha-h])[.)]|([A-H]))(?:[\s.,;:)]|$)")
_BARE_LETTER = re.compile(r"^\s*\(?([A-H])\)?\.?\s*$")
_PREFIX = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option)\s*(?:is|:)\s*", re.IGNORECASE)
_WORD = re.compile(r"\w+")
_ARTICLES = {"a", "an", "the"}


def blind_messages(item: RefereeItem) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": BLIND_INSTRUCTION},
                                         {"type": "text", "text": f"Question: {item.question}"}]}]


def normalise(text: str) -> list[str]:
    """Words of an answer, compared loosely: NFKC, case folded, "the answer is" and articles dropped."""
    text = _PREFIX.sub("", unicodedata.normalize("NFKC", text or "").strip())
    return [w for w in _WORD.findall(text.casefold()) if w not in _ARTICLES]


def option_letter(text: str) -> str | None:
    """The option letter an answer gives ("B", "(B)", "B. a cat", "Answer: B"), or None."""
    match = _LETTER_ANSWER.match(text or "")
    return next((g.upper() for g in match.groups() if g), None) if match else None


def is_multiple_choice(question: str, answer: str) -> bool:
    """The question lists two options or more ("A. ...", "(B) ..."), or the answer is a bare option letter."""
    return len(set(_OPTION.findall(question or ""))) >= 2 or bool(_BARE_LETTER.match(answer or ""))


def token_f1(a: Sequence[str], b: Sequence[str]) -> float:
    common = sum((Counter(a) & Counter(b)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def _contains(longer: Sequence[str], shorter: Sequence[str]) -> bool:
    n = len(shorter)
    return n > 0 and any(list(longer[i:i + n]) == list(shorter) for i in range(len(longer) - n + 1))


def answers_agree(question: str, reference: str, predicted: str, f1_threshold: float = F1_THRESHOLD) -> float:
    """How far the text-only answer agrees with the sample's: 1.0 or 0.0, or the token F1 (long answers).
    The vote is ``agreement >= f1_threshold``."""
    if is_multiple_choice(question, reference):
        mine = option_letter(reference)
        if mine is not None:
            return float(option_letter(predicted) == mine)
    ref, pred = normalise(reference), normalise(predicted)
    if not ref or not pred or pred == ["unknown"]:
        return 0.0
    if len(ref) <= SHORT_WORDS or len(pred) <= SHORT_WORDS:
        return float(ref == pred or _contains(pred, ref) or (len(pred) <= SHORT_WORDS and _contains(ref, pred)))
    return round(token_f1(pred, ref), 4)


class BlindReferee(EndpointReferee):
    """An endpoint referee that asks the question alone (no image part, no answer) and votes by comparing."""

    f1_threshold = F1_THRESHOLD

    def _request(self, item: RefereeItem, constraint: str):
        from processors.llm.request import LLMRequest

        # A free answer: no digit constraint, no logprobs (the constraint argument is ignored on purpose).
        return LLMRequest(key=item.qa_id, messages=blind_messages(item), prompt_version=BLIND_PROMPT_VERSION,
                          max_tokens=BLIND_MAX_TOKENS, temperature=0.0, accept_truncated=True)

    def votes(self, items: Sequence[RefereeItem], plan: list[tuple[Any, str]], results: list[list]) -> list[Vote]:
        by_key = {result.key: result for group_results in results for result in group_results}
        return [self._vote(item, by_key.get(item.qa_id)) for item in items]

    def _vote(self, item: RefereeItem, result) -> Vote:
        if result is None:
            return Vote(item.qa_id, None, None, error="api_error", detail="no reply returned")
        if not result.ok:
            return Vote(item.qa_id, None, None, error=result.reason or "api_error", detail=result.detail)
        if item.answer is None:
            return Vote(item.qa_id, None, None, error="unparsable",
                        detail="the blind check needs the sample's answer: give the referee see_answer: true")
        reply = unfenced(result.raw_text or "")  # an answer sent as a code block is the answer inside it
        agreement = answers_agree(item.question, item.answer, reply, self.f1_threshold)
        return Vote(item.qa_id, int(agreement >= self.f1_threshold), agreement,
                    detail=f"answered without the image: {reply[:80]!r}")
