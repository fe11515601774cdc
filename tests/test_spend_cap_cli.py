"""The spend cap through the command line: a cap hit mid-stage exits 3 naming it, finished shards are kept, and
the same command with a higher cap finishes paying for nothing twice; a cap changes no fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builder.config import ConfigError
from builder.status import stage_summaries
from taskgalaxy import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _capped(tmp_path: Path, **llm) -> Path:
    config = yaml.safe_load(DEMO.read_text())
    config["llm"].update(llm)
    path = tmp_path / f"capped-{len(list(tmp_path.glob('capped-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, run_dir: Path) -> int:
    return main(["run", str(config), "--dry-run", "--run-dir", str(run_dir), "--stages", "taxonomy",
                 "--no-progress"])


def _taxonomy(run_dir: Path) -> dict:
    return next(s for s in stage_summaries(run_dir) if s["stage"] == "taxonomy")


def test_a_cap_hit_mid_stage_exits_3_and_a_higher_cap_resumes_paying_nothing_twice(tmp_path, capsys):
    assert _run(DEMO, tmp_path / "clean") == 0  # the demo's taxonomy under the simulator, priced as gpt-4o
    clean = _taxonomy(tmp_path / "clean")
    assert clean["done"] and clean["cost_usd"] > 0.1
    capsys.readouterr()

    cap = round(clean["cost_usd"] / 3, 4)
    assert _run(_capped(tmp_path, max_cost_usd=cap), tmp_path / "run") == 3
    err = capsys.readouterr().err
    assert "llm.max_cost_usd" in err and f"${cap:.4f}" in err and "rerun the same command" in err
    stopped = _taxonomy(tmp_path / "run")
    assert not stopped["done"] and 0 < stopped["cost_usd"] <= cap and stopped["requests"] < clean["requests"]

    assert _run(_capped(tmp_path, max_cost_usd=clean["cost_usd"] * 2), tmp_path / "run") == 0
    resumed = _taxonomy(tmp_path / "run")
    assert resumed["done"] and resumed["rows_out"] == clean["rows_out"]
    # every request paid once over both runs: as many as the uncapped run paid, the first run's from the cache
    assert resumed["requests"] == clean["requests"] and resumed["cache_hits"] > 0
    assert resumed["cost_usd"] == pytest.approx(clean["cost_usd"], abs=1e-3)


def test_a_stage_cap_names_the_stage(tmp_path, capsys):
    assert _run(_capped(tmp_path, stage_max_cost_usd={"taxonomy": 0.01}), tmp_path / "run") == 3
    assert "llm.stage_max_cost_usd.taxonomy" in capsys.readouterr().err


def test_a_cap_changes_no_fingerprint(tmp_path):
    from processors.session import open_run

    capped = _capped(tmp_path, max_cost_usd=1.0, stage_max_cost_usd={"filter": 0.5, "qa": 0.5})
    for dry_run in (False, True):
        runners = [open_run(config, run_dir=tmp_path / "run", dry_run=dry_run, progress=False)
                   for config in (DEMO, capped)]
        plain, with_cap = ({stage.name: runner.fingerprint_of(stage.name) for stage in runner.stages}
                           for runner in runners)
        assert plain == with_cap


def test_a_cap_under_ray_is_refused_at_the_start(tmp_path):
    from processors.session import load_run_config, run_services

    config = load_run_config(_capped(tmp_path, max_cost_usd=1.0))
    ray = type("RayEngine", (), {"name": "ray", "connect": lambda self: None})()
    with pytest.raises(ConfigError, match="local engine only"):
        with run_services(config, ray, run_dir=tmp_path / "run"):
            pass


def test_a_cap_hit_prints_what_each_stage_spent(tmp_path, capsys):
    assert _run(_capped(tmp_path, stage_max_cost_usd={"taxonomy": 0.01}), tmp_path / "run") == 3
    out = capsys.readouterr().out
    assert "taxonomy" in out and "cost" in out.lower()  # the status table, as after exit 75


def test_a_stage_cap_naming_no_stage_is_a_config_error(tmp_path, capsys):
    # a typo would leave the stage its owner meant without a cap
    assert _run(_capped(tmp_path, stage_max_cost_usd={"filtr": 1.0}), tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "llm.stage_max_cost_usd names 'filtr'" in err and "filter" in err
    assert not (tmp_path / "run" / "01_taxonomy").exists()
