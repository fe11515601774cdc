"""A stage's fingerprint: its name, the fingerprints of every stage it reads, its config (less the knobs that
only decide how the work is cut or how fast it runs), its own parts (prompt versions, model ids), the
output-affecting settings it shares with the run (``Stage.settings_parts``) and whether the run is dry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from builder.config import ConfigError
from builder.ids import fingerprint
from builder.stage import Stage


def without_shard_size(config: dict[str, Any]) -> dict[str, Any]:
    """A stage's fingerprinted config minus its ``shard_size``. Like ``run.shard_size`` it only decides how
    the work is cut, so changing it must not re-run finished work; a stage that resumes keeps the boundaries
    recorded in its state (for the row-wise stages they never change a row's output at all)."""
    return {k: v for k, v in config.items() if k != "shard_size"}


def stage_reads(stage: Stage) -> tuple[str, ...]:
    """Every stage ``stage`` reads: its upstream, then its side inputs."""
    return tuple(n for n in (stage.upstream, *stage.side_inputs) if n)


def stage_fingerprints(stages: Sequence[Stage], config: Any, dry_run: bool) -> dict[str, str]:
    """Each stage's fingerprint, in pipeline order (a stage may only read stages before it)."""
    prints: dict[str, str] = {}
    for stage in stages:
        reads = stage_reads(stage)
        missing = [n for n in reads if n not in prints]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which do not come before it")
        stage_config = getattr(config.stages, stage.name)
        try:
            shared = stage.settings_parts(stage_config, config)
        except (KeyError, ValueError) as exc:  # e.g. a stage naming an endpoint the config lacks
            raise ConfigError(f"config error: {exc.args[0] if exc.args else exc}") from None
        prints[stage.name] = fingerprint(
            stage.name,
            {n: prints[n] for n in reads},
            without_shard_size(stage.fingerprint_config(stage_config)),
            stage.fingerprint_parts(stage_config),
            shared,
            {"dry_run": dry_run},
        )
    return prints
