"""What a referee takes and gives back, independent of the backend (local transformers or an endpoint).

A referee answers, for one (image, task type, question[, answer]), whether the pair suits the image:
``p_yes`` = p(1) / (p(0) + p(1)) for the first answer token, each digit's probability summed over all of its
token ids ("1", " 1", "▁1", ...), and ``vote`` = 1 exactly when p(1) > p(0). Both backends follow that
definition so their votes are comparable. A sample the referee
could not judge comes back as a ``Vote`` with ``error`` set (a reason code) — never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class RefereeItem:
    """One sample to judge. ``answer`` is only shown to referees configured with ``see_answer``."""

    qa_id: str
    image_path: str
    task_type: str
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class Vote:
    """A referee's verdict on one ``qa_id``; ``vote``/``p_yes`` are ``None`` exactly when ``error`` is set.

    ``error`` is a reason code of the failure ledger (``image_corrupt``, ``api_error``, ...); ``detail`` says
    what happened in words.
    """

    qa_id: str
    vote: int | None
    p_yes: float | None
    error: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Referee(Protocol):
    """The seam between the score stage and a backend: one ``Vote`` per item, in the items' order."""

    name: str

    def score(self, items: Sequence[RefereeItem]) -> list[Vote]: ...
