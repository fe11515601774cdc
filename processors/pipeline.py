"""The explicit stage list and the services a dry run needs. Adding a stage adds one line here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from builder.stage import Stage


def default_stages() -> list[Stage]:
    """The product's pipeline, in order (imports deferred so ``import processors`` stays cheap)."""
    return []


def config_sections() -> dict[str, type[BaseModel]]:
    """Top-level config sections besides ``run`` and ``stages``."""
    return {}


@contextlib.contextmanager
def start_dry_run_services() -> Iterator[dict[str, Any]]:
    yield {}
