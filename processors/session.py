"""Setting up a run from a config file: validated config, run folder, stage list and run-time services.

``taskgalaxy run`` and the tests build runs the same way through ``open_run``; the CLI only parses argv.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from builder.config import ConfigError, build_config_model, load_config
from builder.runner import Runner
from builder.stage import Stage

if TYPE_CHECKING:
    from processors.simulator.responders import Responder

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
def dry_run_services(enabled: bool, responders: Iterable[Responder] | None = None) -> Iterator[dict[str, Any]]:
    """Under ``--dry-run``: an in-process OpenAI-compatible simulator that every LLM call goes to.

    It answers with ``responders``, None meaning the pipeline's (``processors.pipeline.default_responders``);
    a test running a pipeline with an extra LLM stage passes ``[*default_responders(), its_responder]``."""
    if not enabled:
        yield {}
        return
    from processors.pipeline import start_dry_run_services

    with start_dry_run_services(responders) as services:
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
    engine: str | None = None,
    ray_address: str | None = None,
    accept_unanswered: bool = False,
) -> Runner:
    """The run of ``config_path``; ``engine`` and ``ray_address`` (the CLI's ``--engine``, ``--ray-address``)
    replace ``run.engine`` and ``run.ray_address`` when given."""
    if stages is None:
        stages, sections = pipeline_parts()
    config = load_config(config_path, build_config_model(stages, sections))
    config = with_engine(config, engine, ray_address)
    folder = Path(run_dir) if run_dir else default_run_dir(config, dry_run=dry_run)
    from processors.pipeline import check_consistency, check_credentials

    check_consistency(config)
    credentials = functools.partial(check_credentials, config, dry_run=dry_run)

    def preflight(selected: list[Stage]) -> None:  # the runner calls it before the run folder exists
        credentials(selected)
        check_seed_files(config, selected)

    runner_engine = make_engine(config, stages)
    return Runner(list(stages), config, folder, dry_run=dry_run, services=services or {}, progress=progress,
                  preflight=preflight, engine=runner_engine, accept_unanswered=accept_unanswered,
                  run_scope=functools.partial(run_services, config, runner_engine, run_dir=folder))


def with_engine(config: Any, engine: str | None, ray_address: str | None) -> Any:
    """``config`` with the command line's engine choice (validated like the YAML's)."""
    updates = {key: value for key, value in (("engine", engine), ("ray_address", ray_address)) if value is not None}
    if not updates:
        return config
    from pydantic import ValidationError

    try:
        run = type(config.run).model_validate({**config.run.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(f"--engine/--ray-address: {exc.errors()[0]['msg']}") from None
    return config.model_copy(update={"run": run})


def make_engine(config: Any, stages: Sequence[Stage] = ()):
    """The engine ``run.engine`` names: this process, or a Ray cluster (``docs/scaling.md``). What each stage
    asks of a Ray worker is checked here, so a bad combination is a config error before anything runs."""
    from builder.engine import LocalEngine

    if config.run.engine != "ray":
        return LocalEngine()
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("run.engine: ray needs Ray: pip install 'taskgalaxy[ray]' (or 'ray[data]>=2.60')") from None
    from builder.ray_engine import RayEngine

    for stage in stages:
        try:
            stage.resources(getattr(config.stages, stage.name))
        except ValueError as exc:
            raise ConfigError(f"config error: {exc}; nothing was run") from None

    return RayEngine(config.run.ray_address,
                     overrides={name: r.given() for name, r in config.run.ray_resources.items()})


@contextlib.contextmanager
def run_services(config: Any, engine: Any = None, run_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """What lives as long as one run: the LLM accounts (one admission and breaker per endpoint, shared by every
    shard and stage of the run, and the run's spend caps: ``llm.max_cost_usd``, ``llm.stage_max_cost_usd``,
    counted from what ``run_dir`` records as spent by earlier runs). On Ray, the accounts of every worker lease
    from one shared budget (a named actor, ``processors.llm.ray_budget``), and each worker checks it sees the
    image roots and opens the request cache safely (``processors.ray_worker``)."""
    from processors.llm.accounts import run_accounts
    from processors.llm.limits import SpendCap

    share = config.llm.budget_share
    capped = config.llm.max_cost_usd is not None or bool(config.llm.stage_max_cost_usd)
    if getattr(engine, "name", "local") != "ray":
        spend = SpendCap(config.llm.max_cost_usd, config.llm.stage_max_cost_usd,
                         recorded_spend(run_dir) if capped and run_dir is not None else None)
        with run_accounts(share, spend=spend) as services:
            yield services
        return
    if capped:
        raise ConfigError("config error: llm.max_cost_usd / llm.stage_max_cost_usd are enforced by the local "
                          "engine only: remove them to run with run.engine: ray (or --engine local); nothing "
                          "was run")
    from builder.ray_tasks import WORKER_CHECKS
    from processors.llm.ray_budget import shared_budget
    from processors.ray_worker import check_image_roots

    engine.connect()
    with shared_budget() as budget, run_accounts(share, lease_from=budget) as services:
        yield {**services, WORKER_CHECKS: [check_image_roots]}


def recorded_spend(run_dir: Path) -> dict[str, float]:
    """USD paid per stage in ``run_dir`` so far (earlier runs and stopped attempts included), as ``status``
    shows it: what a spend cap starts from."""
    from builder.status import stage_summaries

    if not Path(run_dir).is_dir():
        return {}
    return {summary["stage"]: float(summary["usage"].get("cost_usd", 0.0)) for summary in stage_summaries(run_dir)}


def check_seed_files(config: Any, selected: Sequence[Stage]) -> None:
    """Read the seed and task-type files of a selected taxonomy stage now, before the run folder exists: a bad
    line is then a config error (exit 2) and "nothing was run" holds for the disk too. The stage reads them
    again when it lists its inputs; they are small, and a file that changes in between changes the fingerprint."""
    taxonomy = getattr(config.stages, "taxonomy", None)
    if taxonomy is None or not any(stage.name == "taxonomy" for stage in selected):
        return
    from loaders.taxonomy.seeds import SeedError, read_seeds, read_tasktypes

    strict = getattr(taxonomy, "seed_errors", "fail") == "fail"
    for key, read in (("seeds", read_seeds), ("import_tasktypes", read_tasktypes)):
        path = getattr(taxonomy, key, None)
        if path is None:
            continue
        try:
            read(path, strict=strict)
        except SeedError as exc:
            raise ConfigError(f"config error: stages.taxonomy.{key}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config error: stages.taxonomy.{key}: cannot read {path} ({exc.strerror or exc}); "
                              "nothing was run") from None
