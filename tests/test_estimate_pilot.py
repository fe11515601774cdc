"""``taskgalaxy estimate --from-run``: a real dry-run pilot (simulator, three endpoint referees, no local model)
projected to its own size gives back its own totals, scales linearly, replays the referee cascade on its votes,
and the CLI says which figures came from the pilot."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from builder.outputs import column_values, load_stage_output
from builder.status import stage_summaries
from processors.estimate_pilot import cascade_asked, project_from_run, spread
from processors.session import load_run_config
from taskgalaxy import main

PILOT_IMAGES = 16
CONFIG = f"""
run: {{name: pilot, shard_size: 8}}
llm:
  endpoints:
    gpt4o: {{model: gpt-4o-2024-08-06, image_max_side: 256}}
    referee_a: {{base_url: "http://localhost:9/v1", api_key_env: null, model: internvl-chat-v1.5}}
stages:
  taxonomy: {{levels: 2, rounds_per_level: 1, children_per_request: 4, new_first_level_per_round: 2, plots: false}}
  images:
    sources: [{{type: synthetic, count: {PILOT_IMAGES}, seed: 3}}]
  match: {{model: tg-tiny-clip, pretrained: null, top_k: 6}}
  score:
    referees:
      - {{name: referee_a, preset: internvl-chat-v1.5, endpoint: {{endpoint: referee_a}}}}
      - {{name: referee_b, preset: internvl2-26b, endpoint: {{endpoint: referee_a}}}}
      - {{name: referee_c, preset: glm-4v-9b, endpoint: {{endpoint: referee_a}}}}
  final: {{threshold: 2}}
"""
LLM_STAGES = ("taxonomy", "filter", "qa", "score")


@pytest.fixture(scope="module")
def pilot(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pilot")
    config = root / "pilot.yaml"
    config.write_text(CONFIG)
    assert main(["run", str(config), "--dry-run", "--run-dir", str(root / "run"), "--no-progress"]) == 0
    return config, root / "run"


def _paid(run: Path) -> dict[str, dict]:
    return {s["stage"]: s["usage"] for s in stage_summaries(run) if s["stage"] in LLM_STAGES}


def test_the_pilot_projected_to_its_own_size_gives_back_its_totals(pilot):
    config, run = pilot
    estimate = project_from_run(run, load_run_config(config), PILOT_IMAGES)
    paid = _paid(run)
    assert [s.stage for s in estimate.stages] == list(LLM_STAGES)
    for s in estimate.stages:
        usage = paid[s.stage]
        assert s.requests == pytest.approx(usage["requests"])
        assert s.prompt_tokens == pytest.approx(usage["prompt_tokens"])
        assert s.completion_tokens == pytest.approx(usage["completion_tokens"])
        assert s.cached_tokens == pytest.approx(usage.get("cached_tokens", 0))
        # the pilot ran online under the same prices: its bill is the online column
        assert s.usd["online"] == pytest.approx(usage["cost_usd"], rel=1e-6, abs=1e-9)
        assert s.usd["batch"] <= s.usd["online"]
    assert estimate.total_usd("online") == pytest.approx(sum(u["cost_usd"] for u in paid.values()))


def test_the_projection_scales_linearly_except_the_taxonomy(pilot):
    config, run = pilot
    run_config = load_run_config(config)
    one, ten = (project_from_run(run, run_config, n) for n in (PILOT_IMAGES, 10 * PILOT_IMAGES))
    for small, big in zip(one.stages, ten.stages):
        factor = 1 if small.stage == "taxonomy" else 10
        for name in ("requests", "prompt_tokens", "completion_tokens"):
            assert getattr(big, name) == pytest.approx(factor * getattr(small, name))
        assert big.usd["online"] == pytest.approx(factor * small.usd["online"])
    qa_small, qa_big = (next(s for s in e.stages if s.stage == "qa") for e in (one, ten))
    assert 0 < qa_big.rel_range < qa_small.rel_range  # more images: a narrower range (prediction interval)
    low, high = qa_big.range(qa_big.requests)
    assert low < qa_big.requests < high


def test_the_cascade_is_replayed_on_the_pilots_votes(pilot):
    config, run = pilot
    run_config = load_run_config(config)
    votes = column_values(load_stage_output(run, "score"), "votes")
    names = ["referee_a", "referee_b", "referee_c"]
    expected = sum(sum(cascade_asked([v[n] for n in names], 2)) for v in votes)
    estimate = project_from_run(run, run_config, PILOT_IMAGES)
    referees = estimate.referees
    assert not referees.measured
    assert referees.full_requests == pytest.approx(3 * len(votes))
    assert referees.cascade_requests == pytest.approx(expected) and expected < 3 * len(votes)
    assert referees.by_referee["referee_a"] == (len(votes), len(votes))  # the first referee is always asked

    # a config with the cascade on: the score stage's requests and tokens follow the replayed votes
    stages = SimpleNamespace(**{name: getattr(run_config.stages, name)
                                for name in type(run_config.stages).model_fields})
    stages.score = run_config.stages.score.model_copy(update={"cascade": True})
    cascaded = project_from_run(run, SimpleNamespace(llm=run_config.llm, stages=stages), PILOT_IMAGES)
    plain_score, cascade_score = (next(s for s in e.stages if s.stage == "score") for e in (estimate, cascaded))
    ratio = expected / (3 * len(votes))
    assert cascade_score.requests == pytest.approx(plain_score.requests * ratio)
    assert cascade_score.prompt_tokens == pytest.approx(plain_score.prompt_tokens * ratio)


@pytest.mark.parametrize("votes, threshold, asked", [
    ([1, 1, 0], 2, [True, True, False]),  # two yes decide 2 of 3
    ([0, 0, 1], 2, [True, True, False]),  # two no: 0 + 1 left < 2
    ([1, 0, 1], 2, [True, True, True]),  # split: the third decides
    ([0, 1, 1], 1, [True, True, False]),
    ([1, 1], 3, [False, False]),  # a threshold above the referees: decided before anyone is asked
    ([None, 1, 1], 2, [True, True, True]),  # a missing vote counts no yes
])
def test_cascade_rule(votes, threshold, asked):
    assert cascade_asked(votes, threshold) == asked


def test_spread_is_zero_without_variance_and_narrows_with_the_target():
    assert spread([1, 1, 1, 1], 4, 100) == 0
    assert spread([0, 2, 1, 3], 4, 1000) < spread([0, 2, 1, 3], 4, 10)


def test_the_cli_prints_the_projection_and_names_what_came_from_the_pilot(pilot, capsys):
    config, run = pilot
    capsys.readouterr()
    assert main(["estimate", str(config), "--from-run", str(run), "--images", "825000"]) == 0
    out = capsys.readouterr().out
    assert "projected from a pilot of 16 images to 825,000 images" in out
    assert "from the pilot: 16 pilot images" in out and "assumed:" in out
    assert "referee votes:" in out and "with it" in out
    for stage in LLM_STAGES:
        assert f"\n{stage} " in out
    # without --from-run the fixed assumptions answer, as before
    assert main(["estimate", str(config), "--images", "1000"]) == 0
    out = capsys.readouterr().out
    assert "assumptions: 1,000 images" in out and "from the pilot" not in out


def test_a_partial_pilot_says_what_it_cannot_project(pilot, tmp_path, capsys):
    config, _ = pilot
    run = tmp_path / "partial"
    assert main(["run", str(config), "--dry-run", "--run-dir", str(run), "--no-progress",
                 "--stages", "taxonomy,images,match,filter"]) == 0
    estimate = project_from_run(run, load_run_config(config), 100)
    assert [s.stage for s in estimate.stages] == ["taxonomy", "filter"]
    assert any("qa: calls an LLM" in note and "NOT projected" in note for note in estimate.assumed)
    capsys.readouterr()
    assert main(["estimate", str(config), "--from-run", str(tmp_path / "nowhere"), "--images", "10"]) == 2


def test_a_pilot_that_ran_the_cascade_is_counted_not_replayed(pilot, monkeypatch):
    """The score output of a cascaded pilot: votes not asked are None and named in ``not_asked``."""
    import builder.outputs

    config, run = pilot
    names = ["referee_a", "referee_b", "referee_c"]
    plain = load_stage_output(run, "score")
    votes, not_asked = [], []
    for row_votes in column_values(plain, "votes"):
        asked = cascade_asked([row_votes[n] for n in names], 2)
        votes.append({n: row_votes[n] if a else None for n, a in zip(names, asked)})
        not_asked.append([n for n, a in zip(names, asked) if not a])
    cascaded = plain.remove_columns("votes").add_column("votes", votes).add_column("not_asked", not_asked)
    real = builder.outputs.load_stage_output
    monkeypatch.setattr(builder.outputs, "load_stage_output",
                        lambda run_dir, name, **kw: cascaded if name == "score" else real(run_dir, name, **kw))
    estimate = project_from_run(run, load_run_config(config), PILOT_IMAGES)
    asked = sum(len(names) - len(skipped) for skipped in not_asked)
    assert estimate.referees.measured and estimate.referees.cascade_requests == pytest.approx(asked)
    assert estimate.referees.full_requests == pytest.approx(3 * len(votes))
    # the pilot's requests were the cascade's (here the recorded ones stand for them); the config asks all
    score = next(s for s in estimate.stages if s.stage == "score")
    assert score.requests == pytest.approx(_paid(run)["score"]["requests"] * 3 * len(votes) / asked)
