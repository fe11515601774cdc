"""What the QA step will cost per input image, before anything is sent (for ``taskgalaxy estimate``).

Pure arithmetic over the prompt template and the config: the prompt is built for ``types_per_image``
made-up task types of ``type_chars`` characters, the image counts as a square of the endpoint's
``image_max_side`` at its ``detail``, and each question–answer item is expected to take ``qa_chars``
characters of JSON (question ~150, answer ~350, keys and quotes ~60; characters / 4 = tokens). A share
``repair_rate`` of replies is expected to need the repair turn, which re-sends the prompt plus the reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from processors.llm.estimate import CHARS_PER_TOKEN, TOKENS_PER_MESSAGE, cost_usd, mode_tier, project
from processors.llm.settings import LLMSettings
from processors.qa.config import QAConfig
from processors.qa.prompt import build_layout_messages, build_messages, repair_messages

QA_CHARS = 560
REPLY_OVERHEAD_CHARS = 12  # {"qa": [ ... ]}


@dataclass(frozen=True)
class QAEstimate:
    """Expected figures for ONE input image (multiply by the number of images)."""

    requests: float
    prompt_tokens: float
    completion_tokens: float
    cost_usd: float


def _prompt_chars(config: QAConfig, types_per_image: float, type_chars: int) -> int:
    count = max(1, round(types_per_image))
    build = build_layout_messages if config.prompt_layout == "cache_friendly" else build_messages
    messages = build("image", ["x" * type_chars] * count, per_type=config.questions_per_type,
                     language=config.language)
    chars = len(messages[0]["content"]) + len(messages[1]["content"][1]["text"])
    return chars + round((types_per_image - count) * (type_chars + 3))  # fractional types, linearly


def estimate_per_image(config: QAConfig, settings: LLMSettings, *, types_per_image: float = 3.0,
                       type_chars: int = 40, qa_chars: int = QA_CHARS, repair_rate: float = 0.02) -> QAEstimate:
    """Requests, tokens and dollars the ``qa`` stage is expected to spend on one image."""
    reply_chars = REPLY_OVERHEAD_CHARS + qa_chars * config.questions_per_type * types_per_image
    reply_tokens = min(config.max_tokens, math.ceil(reply_chars / CHARS_PER_TOKEN))
    prompt_chars = _prompt_chars(config, types_per_image, type_chars)
    first = project(settings, config.endpoint, requests=1, prompt_text_chars=prompt_chars, images_per_request=1,
                    completion_tokens=reply_tokens)
    repair_extra = len(repair_messages([], "")[-1]["content"]) + reply_chars
    repair_prompt = first.prompt_tokens + 2 * TOKENS_PER_MESSAGE + math.ceil(repair_extra / CHARS_PER_TOKEN)
    prompt = first.prompt_tokens + repair_rate * repair_prompt
    completion = reply_tokens * (1 + repair_rate)
    model = settings.endpoint(config.endpoint)
    dollars = cost_usd(settings, model.model, prompt, completion, tier=mode_tier(model))
    return QAEstimate(requests=1 + repair_rate, prompt_tokens=prompt, completion_tokens=completion, cost_usd=dollars)
