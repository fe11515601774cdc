"""The ``qa`` stage's config (``stages.qa`` in the run YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from builder.stage import StageConfig
from processors.prompt_layout import PromptLayout


class QAConfig(StageConfig):
    endpoint: str = Field("gpt4o", description="which llm.endpoints entry answers")
    questions_per_type: int = Field(1, ge=1, le=10, description="questions asked (and kept at most) per task type")
    min_question_chars: int = Field(10, ge=1, description="shorter questions are rejected (question_length)")
    max_question_chars: int = Field(600, ge=1, description="longer questions are rejected (question_length)")
    min_answer_chars: int = Field(1, ge=1, description="shorter answers are rejected (answer_length)")
    max_answer_chars: int = Field(3000, ge=1, description="longer answers are rejected (answer_length)")
    language: Literal["en", "zh", "any"] = Field(
        "en", description="language asked for and checked (a script-share heuristic); 'any' checks nothing")
    min_language_share: float = Field(
        0.8, gt=0, le=1, description="share of a QA's text that must be in the language's script")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature of the QA requests")
    max_tokens: int = Field(4096, ge=64, description="reply cap; a reply cut there fails 'truncated'")
    use_json_schema: bool = Field(True, description="ask for structured output (json_schema response_format)")
    repair: bool = Field(True, description="one follow-up turn asking to fix a reply that did not parse")
    # Left out of dumps (and so of the fingerprint) at the default: the paper-faithful run is unchanged.
    prompt_layout: PromptLayout = Field(
        "paper", exclude_if=lambda value: value == "paper",
        description="cache_friendly: the preamble shared with the filter request, then the image, then the task "
        "types, under one schema without per-image enums (processors/prompt_layout.py)")

    @model_validator(mode="after")
    def _bounds(self) -> "QAConfig":
        for kind in ("question", "answer"):
            low, high = getattr(self, f"min_{kind}_chars"), getattr(self, f"max_{kind}_chars")
            if low > high:
                raise ValueError(f"min_{kind}_chars ({low}) is larger than max_{kind}_chars ({high})")
        return self
