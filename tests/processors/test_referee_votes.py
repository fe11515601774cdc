"""Reading a vote out of a reply that wraps its digit: a code fence, quotes, brackets, JSON debris after it."""

from __future__ import annotations

import math

import pytest

from processors.llm import reply as rp
from processors.llm.request import LLMRequest, LLMResult
from processors.referees import RefereeItem
from processors.referees.blind import BlindReferee
from processors.referees.endpoint import _vote, one_digit, read_digits, vote_digit

WRAPPED = [("```json\n1\n```", 1), ("1\n}]", 1), ("```\n0\n```", 0), ('"1"', 1), ("[0]", 0), (" 1 ", 1),
           ("0.", 0), ('["1"]\n```', 1)]
AMBIGUOUS = ["1 or 0", "10", "1, 0", "0\n```json\n1", "yes 1", '{"vote": 1}', "one", "", "2", "```json\n```"]


@pytest.mark.parametrize("text,digit", WRAPPED)
def test_a_wrapped_digit_is_that_vote(text, digit):
    assert vote_digit(text) == str(digit)
    assert one_digit(text) == text  # a constrained vote is accepted, not asked again
    vote = _vote(LLMResult(key="q", ok=True, raw_text=text), 2, "structured_outputs")  # no logprobs: the text
    assert vote.ok and vote.vote == digit and vote.p_yes == float(digit)


@pytest.mark.parametrize("text", AMBIGUOUS)
def test_anything_with_both_digits_or_words_stays_unparsable(text):
    assert vote_digit(text) is None
    with pytest.raises(ValueError):
        one_digit(text)
    assert _vote(LLMResult(key="q", ok=True, raw_text=text), 2, "structured_outputs").error == "unparsable"


def test_a_constrained_vote_in_a_fence_passes_the_engines_parse():
    request = LLMRequest(key="q", messages=[], prompt_version="v", parse=one_digit, max_tokens=1,
                         accept_truncated=True)
    reply = {"text": "```json\n1\n```", "finish_reason": "stop", "refusal": None, "logprobs": None,
             "usage": {"prompt_tokens": 5, "completion_tokens": 6}}
    assert rp.interpret(reply, request) == "```json\n1\n```"


def _entry(token: str, p: float, top: list[tuple[str, float]] | None = None) -> dict:
    return {"token": token, "logprob": math.log(p),
            "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in (top or [(token, p)])]}


def test_the_logprobs_of_a_fenced_vote_are_read_at_its_digit():
    logprobs = [_entry("```", 0.9), _entry("json", 0.95), _entry("\n", 0.99),
                _entry("1", 0.8, [("1", 0.8), ("0", 0.2)]), _entry("\n", 0.9), _entry("```", 0.9)]
    reading = read_digits(logprobs)
    assert reading.p1 == pytest.approx(0.8) and reading.p0 == pytest.approx(0.2)
    vote = _vote(LLMResult(key="q", ok=True, raw_text="```json\n1\n```", logprobs=logprobs), 2, "structured_outputs")
    assert vote.ok and vote.vote == 1 and vote.p_yes == pytest.approx(0.8)
    # A digit after words is not a wrapped vote: the first token is read, as before.
    prose = [_entry("The", 0.9, [("The", 0.9), ("0", 0.05)]), _entry(" answer", 0.9), _entry(" 1", 0.9)]
    assert read_digits(prose).p0 == pytest.approx(0.05) and read_digits(prose).p1 is None


def test_a_blind_answer_sent_as_a_code_block_is_compared_without_its_fence():
    referee = BlindReferee.__new__(BlindReferee)
    item = RefereeItem("q", "x.png", "Counting", "How many cats? A. two B. three", answer="B")
    vote = referee._vote(item, LLMResult(key="q", ok=True, raw_text="```\nB\n```"))
    assert vote.ok and vote.vote == 1
