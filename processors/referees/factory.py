"""Building a ``Referee`` from its settings.

The endpoint backend lives with the async LLM engine (``processors/llm/``); until it is wired in, callers
pass ``endpoint_factory`` — a callable taking the ``RefereeSettings`` and returning any object with
``name`` and ``score(items) -> list[Vote]``.
"""

from __future__ import annotations

from typing import Callable

from processors.referees.protocol import Referee
from processors.referees.settings import RefereeSettings

EndpointFactory = Callable[[RefereeSettings], Referee]


def build_referee(settings: RefereeSettings, *, endpoint_factory: EndpointFactory | None = None) -> Referee:
    """A referee for ``settings``; nothing is loaded until its first ``score`` call."""
    backend = settings.resolved_preset().backend
    if backend == "local":
        from processors.referees.local import LocalReferee

        return LocalReferee(settings)
    if endpoint_factory is None:
        raise ValueError(
            f"referee {settings.name!r} uses the endpoint backend; pass endpoint_factory "
            "(the OpenAI-compatible referee of processors/llm)"
        )
    return endpoint_factory(settings)
