"""The referee prompt: our own wording of the TaskGalaxy protocol (design.md §1 step 5).

The message is ordered instruction → image → task type and question, so every question about one image
shares the longest possible prefix (instruction + image): the local backend computes that prefix once per
image and vLLM's prefix cache hits on it. Changing any text here changes the votes, so bump
``PROMPT_VERSION`` (it is part of every cache key and stage fingerprint).
"""

from __future__ import annotations

from typing import Any

PROMPT_VERSION = "referee-v1"
BLIND_PROMPT_VERSION = "blind-v2"  # the text-only check's prompt (processors.referees.blind)

INSTRUCTION = (
    "You are reviewing training data for a vision-language model. You will see an image, then a task type "
    "and a question written for that image. Decide whether both fit the image: the task type must describe "
    "something that can actually be done with this image, and the question must be answerable from what the "
    "image shows."
)
INSTRUCTION_WITH_ANSWER = INSTRUCTION[:-1] + ", and the proposed answer must be correct for this image."
REPLY_RULE = "Reply with a single digit: 1 if they fit the image, 0 if they do not."


def question_text(task_type: str, question: str, answer: str | None = None) -> str:
    """The text after the image. ``answer`` is shown only when the referee runs with ``see_answer``."""
    lines = [f"Task type: {task_type}", f"Question: {question}"]
    if answer is not None:
        lines.append(f"Proposed answer: {answer}")
    lines.append(REPLY_RULE)
    return "\n".join(lines)


def build_messages(
    task_type: str, question: str, answer: str | None = None, *, image_part: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One user turn in the content-part format both transformers chat templates and OpenAI servers take.

    ``image_part`` defaults to ``{"type": "image"}`` (a transformers placeholder); an endpoint backend passes
    ``{"type": "image_url", "image_url": {"url": data_url}}`` instead. The answer is included only when it is
    not ``None`` — callers decide ``see_answer``.
    """
    instruction = INSTRUCTION if answer is None else INSTRUCTION_WITH_ANSWER
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": instruction},
                image_part or {"type": "image"},
                {"type": "text", "text": question_text(task_type, question, answer)},
            ],
        }
    ]
