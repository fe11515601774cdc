"""`status` shows the prompt tokens a provider read from its prompt cache; a run folder from before the
counter existed reads 0 and shows no line."""

from __future__ import annotations

from toy_run import make_runner

from builder import status
from builder.status import format_table, stage_summaries


def _run(tmp_path):
    run_dir = tmp_path / "run"
    make_runner(run_dir, {"run": {"name": "toy", "shard_size": 4},
                          "stages": {"numbers": {"count": 8}, "square": {}}}).run()
    return run_dir


def test_status_shows_cached_input_tokens(tmp_path, monkeypatch):
    run_dir = _run(tmp_path)
    real_totals = status.stage_totals

    def with_cache(folder, shards_total):
        totals = real_totals(folder, shards_total)
        if folder.name.endswith("square"):
            totals["usage"] = {**totals["usage"], "prompt_tokens": 4000, "completion_tokens": 200,
                               "cached_tokens": 3072}
        return totals

    monkeypatch.setattr(status, "stage_totals", with_cache)
    square = next(s for s in stage_summaries(run_dir) if s["stage"] == "square")
    assert square["cached_tokens"] == 3072 and square["tokens"] == 4200  # cached tokens are part of the prompt
    assert "cached input: 3072 of 4000 prompt tokens (76.8 %)" in format_table(run_dir, stage_summaries(run_dir))


def test_an_old_run_folder_reads_no_cached_tokens(tmp_path):
    run_dir = _run(tmp_path)
    summaries = stage_summaries(run_dir)
    assert all(s["cached_tokens"] == 0 for s in summaries)
    assert "cached input" not in format_table(run_dir, summaries)
