"""The vision-dependency ("blind") referee: a text-only call that never sees the image.

It gets the task type, the question and the proposed answer, and replies 1 when it can tell, from the text
alone, that the answer is right — a question a model answers without looking teaches no vision. The vote is
read like any referee's (one constrained digit + logprobs). The final stage names it in ``blind_referees``:
its vote does not count toward the threshold, and a 1 fails the sample as ``answerable_without_image``.

Settings: a referee with ``blind: true`` and ``see_answer: true`` on an endpoint serving any text model.
"""

from __future__ import annotations

from processors.referees.endpoint import EndpointReferee, constraint_body, one_digit
from processors.referees.protocol import RefereeItem

BLIND_PROMPT_VERSION = "blind-v1"
BLIND_INSTRUCTION = (
    "You cannot see the image this question is about. From the text alone, decide whether the proposed answer "
    "is certainly correct: it follows from the question itself or from general knowledge, with no need to "
    "look at the image."
)
BLIND_REPLY_RULE = "Reply with a single digit: 1 if the answer is certainly correct without the image, 0 if not."


def blind_messages(item: RefereeItem) -> list[dict]:
    text = "\n".join([f"Task type: {item.task_type}", f"Question: {item.question}",
                      f"Proposed answer: {item.answer or ''}", BLIND_REPLY_RULE])
    return [{"role": "user", "content": [{"type": "text", "text": BLIND_INSTRUCTION},
                                         {"type": "text", "text": text}]}]


class BlindReferee(EndpointReferee):
    """An endpoint referee whose request carries no image part."""

    def _request(self, item: RefereeItem, constraint: str):
        from processors.llm.request import LLMRequest

        checked = {"parse": one_digit} if constraint != "none" else {}
        return LLMRequest(key=item.qa_id, messages=blind_messages(item), prompt_version=BLIND_PROMPT_VERSION,
                          max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.settings.endpoint.top_logprobs,
                          accept_truncated=True, extra_body=constraint_body(constraint), **checked)
