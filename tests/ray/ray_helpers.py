"""Helpers of the Ray tests: the small config, running it, copying and comparing run folders."""

from __future__ import annotations

import shutil
from pathlib import Path

CONFIG = """
run: {name: travel, shard_size: 6}
llm:
  endpoints:
    gpt4o: {model: gpt-4o-2024-08-06, image_max_side: 256}
    referee_a: {base_url: "http://localhost:9/v1", api_key_env: null, model: internvl-chat-v1.5}
stages:
  taxonomy: {levels: 2, rounds_per_level: 1, children_per_request: 3, new_first_level_per_round: 1, plots: false}
  images:
    sources: [{type: synthetic, count: 8, seed: 5}]
  match: {model: tg-tiny-clip, pretrained: null, top_k: 4}
  filter: {shard_size: 2}
  score:
    referees:
      - {name: tiny_llava, preset: tiny-random-llava, batch_size: 8}
      - {name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}
  final: {threshold: 1}
"""
STAGES = ["taxonomy", "images", "match", "filter", "qa", "score", "final"]


def write_config(root: Path, text: str = CONFIG) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "travel.yaml"
    path.write_text(text)
    return path


def run_pipeline(config: Path, run_dir: Path, *, engine: str = "local", only=None, services=None):
    from processors.session import dry_run_services, open_run

    if services is not None:
        runner = open_run(config, run_dir=run_dir, dry_run=True, services=services, progress=False, engine=engine)
        runner.run(only)
        return runner
    with dry_run_services(True) as services:
        runner = open_run(config, run_dir=run_dir, dry_run=True, services=services, progress=False, engine=engine)
        runner.run(only)
    return runner


def copy_until(run_dir: Path, target: Path, last: str) -> Path:
    """A copy of a finished run folder holding the stages up to ``last`` only, and no request cache (the
    copy's LLM stages pay their requests again)."""
    keep = STAGES[: STAGES.index(last) + 1]
    target.mkdir(parents=True)
    for child in run_dir.iterdir():
        stage = child.name[:2].isdigit() and child.name.split("_", 1)[-1]
        if child.name in ("cache", "run.lock") or (stage and stage not in keep):
            continue
        if child.is_dir():
            shutil.copytree(child, target / child.name)  # the stages kept, the image store
        else:
            shutil.copy2(child, target / child.name)
    return target


def stage_tables(run_dir: Path, name: str):
    """(output table, failures table) of a finished stage."""
    import datasets

    from builder.outputs import load_stage_output

    folder = next(run_dir.glob(f"*_{name}"))
    failures = sorted((folder / "failures").glob("shard-*.arrow"))
    fails = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in failures]) if failures else None
    return load_stage_output(run_dir, name).data.table, (fails.data.table if fails is not None else None)


def counts(run_dir: Path) -> dict:
    """What ``status`` shows per stage, less what depends on time and place."""
    from builder.status import stage_summaries

    keep = ("shards_done", "shards_total", "rows_in", "rows_out", "failures_by_reason", "item_failures_by_reason",
            "tokens", "requests", "cost_usd", "fingerprint", "done")
    return {s["stage"]: {k: s.get(k) for k in keep} for s in stage_summaries(run_dir)}

