"""Bad configs fail before anything runs, with a message naming every bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from builder.config import ConfigError, ExistingPath, build_config_model, load_config
from builder.stage import Stage, StageConfig
from toy_stages import TOY_STAGES


class FileConfig(StageConfig):
    seeds: ExistingPath
    rounds: int = Field(2, ge=1)


class NeedsFile(Stage):
    name = "needsfile"
    Config = FileConfig
    key = "k"


MODEL = build_config_model([*TOY_STAGES, NeedsFile()])


def _load(tmp_path: Path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, MODEL)


def test_a_valid_config_resolves_paths_against_its_own_folder(tmp_path):
    (tmp_path / "seeds.txt").write_text("OCR\n")
    config = _load(tmp_path, "run: {name: demo}\nstages:\n  needsfile: {seeds: seeds.txt}\n")
    assert config.stages.needsfile.seeds == tmp_path / "seeds.txt"
    assert config.stages.square.fail_every == 0  # defaults filled in


def test_unknown_key_is_named_with_the_keys_that_exist(tmp_path):
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "run: {name: demo}\nstages:\n  needsfile: {seeds: s.txt, rouns: 3}\n")
    assert "stages.needsfile.rouns: unknown key; expected one of: rounds, seeds" in str(err.value)


def test_wrong_type_is_named_with_the_value_given(tmp_path):
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "run: {name: demo, shard_size: lots}\nstages:\n  needsfile: {seeds: s.txt, rounds: 0}\n")
    message = str(err.value)
    assert "2 problem(s)" in message
    assert "run.shard_size: Input should be a valid integer" in message and "'lots'" in message
    assert "stages.needsfile.rounds: Input should be greater than or equal to 1" in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.needsfile\.seeds: Value error, no such file or folder: .*nope\.txt"):
        _load(tmp_path, "run: {name: demo}\nstages:\n  needsfile: {seeds: nope.txt}\n")


def test_missing_required_key_and_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "stages:\n  needsfile: {}\n")
    assert "run: required key is missing" in str(err.value)
    assert "stages.needsfile.seeds: required key is missing" in str(err.value)


def test_not_yaml_and_no_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        _load(tmp_path, "run: {name: [\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml", MODEL)


def test_cli_reports_a_bad_config_in_one_message_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: demo, colour: blue}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "taskgalaxy", "run", str(bad)], capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.returncode == 2
    assert "run.colour: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for a config that does not validate"


@pytest.mark.parametrize("text, key, lines", [
    ("run: {name: demo}\nstages:\n  square: {fail_every: 2}\n  square: {fail_every: 3}\n", "square", (3, 4)),
    ("run: {name: a}\nrun: {name: b}\nstages: {}\n", "run", (1, 2)),
    ("run:\n  name: demo\n  shard_size: 4\n  shard_size: 8\nstages: {}\n", "shard_size", (3, 4)),
])
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path, text, key, lines):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert f"key {key!r} is given twice" in str(err.value)
    assert f"on line {lines[0]} and on line {lines[1]}" in str(err.value)


def test_merge_keys_still_work(tmp_path):
    (tmp_path / "s.txt").write_text("x")
    config = _load(tmp_path, "run: {name: demo}\nstages:\n  needsfile: {seeds: s.txt}\n  numbers: &n {count: 5}\n"
                             "  square: {<<: {offset: 1}, fail_every: 2}\n")
    assert config.stages.square.offset == 1 and config.stages.numbers.count == 5


@pytest.mark.parametrize("value", ["sk-proj-AbCdEf0123456789xyzXYZ", "AbCdEf0123456789xyzXYZ0987", "my key"])
def test_an_api_key_typed_where_its_variable_name_belongs_is_refused_unechoed(value):
    from processors.llm.settings import EndpointSettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        EndpointSettings(api_key_env=value)
    assert "not shown" in str(err.value)
    assert EndpointSettings(api_key_env="OPENAI_API_KEY").api_key_env == "OPENAI_API_KEY"


def test_the_config_error_for_a_key_in_api_key_env_does_not_echo_it(tmp_path):
    from processors.pipeline import config_sections

    model = build_config_model(TOY_STAGES, config_sections())
    path = tmp_path / "config.yaml"
    secret = "sk-proj-AbCdEf0123456789xyzXYZ"
    path.write_text(f"run: {{name: demo}}\nllm:\n  endpoints:\n    gpt4o: {{api_key_env: {secret}}}\nstages: {{}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, model)
    assert "llm.endpoints.gpt4o.api_key_env" in str(err.value) and "NAME of the environment variable" in str(err.value)
    assert secret not in str(err.value) and secret[:12] not in str(err.value)


def _demo_config(tmp_path: Path, edit) -> Path:
    import shutil

    import yaml

    repo = Path(__file__).resolve().parents[2] / "configs"
    shutil.copytree(repo / "seeds", tmp_path / "seeds")
    data = yaml.safe_load((repo / "demo.yaml").read_text())
    edit(data)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "demo.yaml"


def test_a_threshold_no_sample_can_reach_is_refused_before_anything_runs(tmp_path):
    from processors.session import open_run

    path = _demo_config(tmp_path, lambda d: d["stages"]["final"].update(threshold=5))
    with pytest.raises(ConfigError, match="threshold is 5, but stages.score has only 3 referees"):
        open_run(path, run_dir=tmp_path / "run", dry_run=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, words", [(True, "valid integer"), (2.5, "valid integer"), (10**6, "less than or equal")])
def test_top_k_must_be_a_plain_whole_number_in_range(tmp_path, value, words):
    from processors.session import open_run

    path = _demo_config(tmp_path, lambda d: d["stages"]["match"].update(top_k=value))
    with pytest.raises(ConfigError, match=f"stages.match.top_k: Input should be (a )?{words}"):
        open_run(path, run_dir=tmp_path / "run", dry_run=True)


def test_a_key_in_a_free_text_field_never_reaches_the_written_config():
    from builder.config import dump_yaml

    text = dump_yaml({"run": {"name": "demo"}, "notes": "token sk-proj-AbCdEf0123456789xyzXYZ here"})
    assert "sk-proj-AbCdEf0123456789xyzXYZ" not in text and "***" in text
