"""The one-key switch: ``run.engine: ray`` / ``--engine ray`` pick the Ray engine with the config's resources,
change no fingerprint, and bad resource keys are refused before anything runs."""

from __future__ import annotations

import pytest
from ray_helpers import CONFIG, write_config

from builder.config import ConfigError


def test_the_command_line_and_the_config_pick_the_ray_engine_without_changing_any_fingerprint(tmp_path):
    from processors.session import open_run

    config = write_config(tmp_path, CONFIG.replace("shard_size: 6}", "shard_size: 6, engine: ray, ray_resources: "
                                                   "{match: {num_gpus: 0.5, workers: 3}}}"))
    ray_runner = open_run(config, run_dir=tmp_path / "a", dry_run=True, progress=False)
    local_runner = open_run(config, run_dir=tmp_path / "b", dry_run=True, progress=False, engine="local")
    assert (ray_runner.engine.name, local_runner.engine.name) == ("ray", "local")
    assert ray_runner.engine.overrides == {"match": {"num_gpus": 0.5, "workers": 3}}
    assert ray_runner._fingerprints == local_runner._fingerprints
    work = ray_runner.stage_work("match")
    need = ray_runner.engine.resources(work)
    assert need["kind"] == "gpu" and need["num_gpus"] == 0.5 and need["workers"] == 3
    assert ray_runner.engine.resources(ray_runner.stage_work("images"))["kind"] == "cpu"
    assert ray_runner.engine.resources(ray_runner.stage_work("filter"))["kind"] == "llm"
    cli = open_run(write_config(tmp_path / "c"), run_dir=tmp_path / "c", dry_run=True, progress=False,
                   engine="ray", ray_address="auto")
    assert cli.engine.name == "ray" and cli.engine.address == "auto" and cli.config.run.engine == "ray"


def test_unknown_resource_keys_are_config_errors(tmp_path):
    from processors.session import open_run

    config = write_config(tmp_path, CONFIG.replace("shard_size: 6}", "shard_size: 6, ray_resources: "
                                                   "{match: {gpus: 1}}}"))
    with pytest.raises(ConfigError, match="run.ray_resources.match.gpus"):
        open_run(config, run_dir=tmp_path / "a", dry_run=True, progress=False)


def test_a_referee_names_its_runtime_env_and_its_workers_get_it(tmp_path):
    from processors.session import open_run

    text = CONFIG.replace("{name: tiny_llava, preset: tiny-random-llava, batch_size: 8}",
                          '{name: tiny_llava, preset: tiny-random-llava, batch_size: 8, runtime_env: '
                          '{pip: ["transformers==4.45.2"]}}')
    runner = open_run(write_config(tmp_path, text), run_dir=tmp_path / "a", dry_run=True, progress=False,
                      engine="ray")
    need = runner.engine.resources(runner.stage_work("score"))
    assert need["runtime_env"] == {"pip": ["transformers==4.45.2"]}
    plain = open_run(write_config(tmp_path / "p"), run_dir=tmp_path / "b", dry_run=True, progress=False)
    assert runner._fingerprints["score"] == plain._fingerprints["score"]  # where a model runs is no vote


def test_local_referees_in_different_environments_are_refused_before_anything_runs(tmp_path):
    from processors.session import open_run

    text = CONFIG.replace(
        "      - {name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}",
        "      - {name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}\n"
        "      - {name: other, preset: tiny-random-llava, runtime_env: {conda: other}}").replace(
        "{name: tiny_llava, preset: tiny-random-llava, batch_size: 8}",
        "{name: tiny_llava, preset: tiny-random-llava, batch_size: 8, runtime_env: {conda: mine}}")
    with pytest.raises(ConfigError, match="different runtime_env"):
        open_run(write_config(tmp_path, text), run_dir=tmp_path / "a", dry_run=True, progress=False, engine="ray")
