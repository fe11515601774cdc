"""Portable runs (issue 14, point 6): the shipped seeds are package data, a wheel runs a copy of the demo config
from any folder, and where a config or checkout lies changes no fingerprint and is written nowhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (without its dependencies) into a folder of its own."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(folder / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = (folder / "dist").glob("taskgalaxy-*.whl")
    assert "processors/taxonomy/data/vision_tasks.yaml" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(folder / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    return folder / "site"


def test_an_installed_wheel_runs_a_copy_of_the_demo_config_from_any_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "configs" / "demo.yaml", elsewhere / "demo.yaml")
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import processors; print(processors.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed))  # the wheel's copy, not the checkout
    run = subprocess.run([sys.executable, "-m", "taskgalaxy", "run", "elsewhere/demo.yaml", "--dry-run",
                          "--stages", "taxonomy", "--run-dir", "run"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert str(installed) not in written and str(ROOT) not in written  # no machine-local install path


def test_a_config_copied_to_another_folder_keeps_every_fingerprint(tmp_path):
    from processors.session import open_run

    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    here = open_run(ROOT / "configs" / "demo.yaml", run_dir=tmp_path / "a", dry_run=True, progress=False)
    there = open_run(tmp_path / "demo.yaml", run_dir=tmp_path / "b", dry_run=True, progress=False)
    assert [here.fingerprint_of(s.name) for s in here.stages] == [there.fingerprint_of(s.name) for s in there.stages]
