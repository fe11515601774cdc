"""Setting up a run from a config file: validated config, run folder, stage list and run-time services.

``taskgalaxy run`` and the tests build runs the same way through ``open_run``; the CLI only parses argv.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from builder.config import build_config_model, load_config
from builder.runner import Runner
from builder.stage import Stage

logger = logging.getLogger(__name__)

DRY_RUN_SUFFIX = "-dry-run"


def default_run_dir(config: Any, *, dry_run: bool) -> Path:
    """``run.run_dir`` or ``runs/<name>``; a dry run never shares a folder with a real (paid) run."""
    base = Path(config.run.run_dir) if config.run.run_dir else Path("runs") / config.run.name
    return base.with_name(base.name + DRY_RUN_SUFFIX) if dry_run else base


def pipeline_parts() -> tuple[list[Stage], dict[str, type[BaseModel]]]:
    """The product's stages and the extra top-level config sections they need."""
    from processors.pipeline import config_sections, default_stages

    return default_stages(), config_sections()


def load_run_config(path: str | Path, stages: Sequence[Stage] | None = None, sections=None):
    if stages is None:
        stages, sections = pipeline_parts()
    return load_config(path, build_config_model(stages, sections))


@contextlib.contextmanager
def dry_run_services(enabled: bool) -> Iterator[dict[str, Any]]:
    """Under ``--dry-run``: an in-process OpenAI-compatible simulator that every LLM call goes to."""
    if not enabled:
        yield {}
        return
    from processors.pipeline import start_dry_run_services

    with start_dry_run_services() as services:
        logger.info("dry run: LLM calls go to the local simulator at %s", services.get("llm_base_url"))
        yield services


def open_run(
    config_path: str | Path,
    *,
    run_dir: str | Path | None = None,
    dry_run: bool = False,
    services: dict[str, Any] | None = None,
    progress: bool = True,
    stages: Sequence[Stage] | None = None,
    sections=None,
) -> Runner:
    if stages is None:
        stages, sections = pipeline_parts()
    config = load_config(config_path, build_config_model(stages, sections))
    folder = Path(run_dir) if run_dir else default_run_dir(config, dry_run=dry_run)
    from processors.pipeline import check_consistency, check_credentials

    check_consistency(config)

    return Runner(list(stages), config, folder, dry_run=dry_run, services=services or {}, progress=progress,
                  preflight=functools.partial(check_credentials, config, dry_run=dry_run))
