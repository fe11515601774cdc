"""The referee kinds, in one table: which class a referee's settings build, and where it runs.

A kind is either a ``backend`` a config names (``Backend``: ``local``, ``endpoint``) or ``blind``: an endpoint
referee with ``blind: true``, which asks the question without the image (``processors.referees.blind``).
Where a kind runs is the one thing the score stage asks of it (``runs_on_device``):

- on the device (``local``): the score stage's own thread, one batch at a time on the GPU; the class takes
  the settings alone, and the model loads on its first ``score`` call;
- on the run's event loop (``endpoint``, ``blind``): the class takes the settings and the score stage's
  ``LLMClient`` and plans ``RequestGroup``s (``plan``/``settle``) that the stage sends together with every
  other endpoint referee's.

A new kind is its module (a class with ``name`` and ``score(items) -> list[Vote]``; an event-loop kind also
``plan`` and ``settle`` like ``EndpointReferee``), one line in ``KINDS`` (a config then names it as its
``backend``), and a test: ``docs/extending.md``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator

if TYPE_CHECKING:
    from processors.llm.client import LLMClient
    from processors.referees.protocol import Referee
    from processors.referees.settings import RefereeSettings

@dataclass(frozen=True)
class RefereeKind:
    target: str  # "module:Class", imported when a referee of this kind is built (torch only for local)
    on_device: bool  # True: runs on the stage's thread (a GPU); False: its requests go on the event loop
    backend: bool = True  # a config may name it as ``backend`` (blind is a flag of an endpoint referee instead)


KINDS: dict[str, RefereeKind] = {
    "local": RefereeKind("processors.referees.local:LocalReferee", on_device=True),
    "endpoint": RefereeKind("processors.referees.endpoint:EndpointReferee", on_device=False),
    "blind": RefereeKind("processors.referees.blind:BlindReferee", on_device=False, backend=False),
}


def _a_backend(value: str) -> str:
    """A ``backend`` must name a kind of ``KINDS`` (read when a config is validated: a kind registered by one
    line there is a backend a config can name, with no other list to extend)."""
    names = [name for name, kind in KINDS.items() if kind.backend]
    if value not in names:
        raise ValueError(f"backend {value!r} is no referee kind; the kinds are {', '.join(names)}")
    return value


Backend = Annotated[str, AfterValidator(_a_backend)]  # what a preset or a referee's settings name as ``backend``


def kind_of(settings: "RefereeSettings") -> str:
    """The ``KINDS`` key of a referee: its backend, or ``blind`` for a blind endpoint referee (a blind local
    one is a config error: ``processors.pipeline.check_consistency``)."""
    backend = settings.resolved_preset().backend
    return "blind" if settings.blind and not KINDS[backend].on_device else backend


def runs_on_device(settings: "RefereeSettings") -> bool:
    """Whether the referee runs on this process's device (True) or asks servers from the event loop."""
    return KINDS[kind_of(settings)].on_device


def llm_endpoints(settings: "RefereeSettings") -> list[str]:
    """The ``llm.endpoints`` the referee calls: none for one on the device."""
    return [] if runs_on_device(settings) else settings.endpoint_names()


def build_referee(settings: "RefereeSettings", client: "LLMClient | None" = None) -> "Referee":
    """A referee for ``settings``; nothing is loaded until its first ``score`` call. ``client`` (the score
    stage's ``LLMClient``) is required by the kinds that run on the event loop."""
    kind = KINDS[kind_of(settings)]
    module, _, name = kind.target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if kind.on_device:
        return cls(settings)
    if client is None:
        raise ValueError(f"referee {settings.name!r} ({kind_of(settings)}) calls LLM endpoints: pass the score "
                         "stage's LLMClient (processors.llm.client)")
    return cls(settings, client)
