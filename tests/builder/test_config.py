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
