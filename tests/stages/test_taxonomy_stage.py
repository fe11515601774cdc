"""The taxonomy stage end to end: runner + LLM engine + simulator over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processors.llm.client import EndpointCall
from builder.config import build_config_model, validate_config
from builder.outputs import load_stage_failures, load_stage_output
from builder.runner import Runner, StageError
from loaders.taxonomy.seeds import SeedError
from processors.llm.settings import LLMSettings
from processors.pipeline import default_responders
from processors.simulator.thread import SimulatorThread
from processors.stages.taxonomy import TaxonomyStage

SEEDS = """\
OCR:
  Scene text:
    - Street sign reading
  Handwriting:
Object counting:
Chart understanding:
  Bar charts:
"""
SMALL = {"levels": 3, "rounds_per_level": 1, "children_per_request": 3, "new_first_level_per_round": 2,
         "plots": False}


@pytest.fixture(scope="module")
def sim():
    with SimulatorThread(responders=default_responders()) as simulator:
        yield simulator


def _runner(tmp_path: Path, sim, stage_config: dict, run_dir: Path | None = None, shard_size: int = 1000) -> Runner:
    seeds = tmp_path / "seeds.yaml"
    if not seeds.exists():
        seeds.write_text(SEEDS, encoding="utf-8")
    stages = [TaxonomyStage()]
    model = build_config_model(stages, {"llm": LLMSettings})
    config = validate_config({"run": {"name": "t", "shard_size": shard_size}, "stages": {"taxonomy": {"seeds": "seeds.yaml", **stage_config}}},
                             model, base_dir=tmp_path)
    return Runner(stages, config, run_dir or tmp_path / "run", dry_run=True, progress=False,
                  services={"llm_base_url": sim.base_url, "llm_api_key": "sk-test"})


def test_growth_outputs_and_accounting(tmp_path, sim):
    sim.reset()
    state = _runner(tmp_path, sim, SMALL).run()["taxonomy"]
    folder = tmp_path / "run" / "00_taxonomy"
    rows = load_stage_output(tmp_path / "run", "taxonomy")
    paths = rows["path"]
    assert state["done"] and state["rows_in"] == 4  # 3 seed subtrees + new-first-level
    assert len(paths) == len(set(paths)) == state["totals"]["rows_out"] > 40
    assert sum(level == 3 for level in rows["level"]) > 0.9 * len(paths)  # a parent may get no usable child
    assert "OCR~Scene text~Street sign reading" in paths
    assert {r["origin"] for r in rows} == {"seed", "generated"}
    first_level = {p.split("~")[0] for p in paths}
    assert {"OCR", "Object counting", "Chart understanding"} < first_level and len(first_level) == 5
    assert all(r["parent"] == r["path"].rpartition("~")[0] for r in rows)
    tasktypes = (folder / "tasktype.txt").read_text(encoding="utf-8").splitlines()
    assert tasktypes == paths
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["leaves"] == len(paths) and stats["types_per_level"]["1"] == 5
    usage = state["totals"]["usage"]
    assert usage["requests"] == sim.stats()["received"] == stats["growth"][0]["asks"]
    assert usage["asks_roots"] == 1 and usage["asks_expand"] > 0 and usage["asks_supplement"] > 0
    failures = load_stage_failures(tmp_path / "run", "taxonomy")
    assert set(failures["item"]) != {None} and stats["rejected_by_reason"] == state["totals"]["item_failures"]
    assert sum(state["totals"]["item_failures"].values()) == len(failures) > 0
    again = _runner(tmp_path, sim, SMALL).run()["taxonomy"]  # finished: nothing re-sent
    assert again["totals"] == state["totals"] and sim.stats()["received"] == usage["requests"]


def test_resume_mid_stage_pays_for_no_request_twice(tmp_path, sim, monkeypatch):
    sim.reset()
    real = EndpointCall.send
    calls = []

    def crash_on_third_level(call, requests):
        calls.append(len(requests))
        if len(calls) == 3:  # level 1 and level 2 are answered and cached; level 3 dies half-way
            real(call, requests[: len(requests) // 2])
            raise ConnectionError("simulated crash")
        return real(call, requests)

    monkeypatch.setattr(EndpointCall, "send", crash_on_third_level)
    with pytest.raises(StageError, match="simulated crash"):
        _runner(tmp_path, sim, SMALL).run()
    paid_before = sim.stats()["received"]
    monkeypatch.setattr(EndpointCall, "send", real)
    state = _runner(tmp_path, sim, SMALL).run()["taxonomy"]
    stats = sim.stats()
    assert stats["duplicates"] == 0 and stats["received"] == stats["keys"]
    assert state["totals"]["usage"]["cache_hits"] == paid_before
    # the stopped attempt's requests count too: they were paid for (their answers then came from the cache)
    assert state["totals"]["usage"]["requests"] == stats["received"]


def test_import_without_expansion_sends_nothing(tmp_path, sim):
    sim.reset()
    imported = tmp_path / "tasktype.txt"
    imported.write_text("OCR~Scene text~Menus\nOCR∼Handwriting\nMaps~Legends\nMaps~Legends\n", encoding="utf-8")
    config = {"import_tasktypes": "tasktype.txt", "expand": False, "plots": True}
    _runner(tmp_path, sim, config).run()
    folder = tmp_path / "run" / "00_taxonomy"
    assert (folder / "sunburst.png").stat().st_size > 1000 and "Maps~Legends" in (folder / "sunburst.html").read_text()
    rows = load_stage_output(tmp_path / "run", "taxonomy")
    assert sorted(zip(rows["path"], rows["origin"])) == [
        ("Chart understanding~Bar charts", "seed"), ("Maps~Legends", "imported"), ("OCR~Handwriting", "seed"),
        ("OCR~Scene text~Menus", "imported"), ("OCR~Scene text~Street sign reading", "seed"),
        ("Object counting", "seed"),
    ]
    assert sim.stats()["received"] == 0


def test_bad_seed_lines_stop_the_run_before_any_request(tmp_path, sim):
    sim.reset()
    (tmp_path / "seeds.txt").write_bytes(b"OCR~Scene text\nCaf\xe9\nOCR~~Signs\n")
    with pytest.raises(SeedError, match=r"line 2: not utf8[\s\S]*line 3: empty name"):
        _runner(tmp_path, sim, {**SMALL, "seeds": "seeds.txt"}).run()
    assert sim.stats()["received"] == 0
    state = _runner(tmp_path, sim, {**SMALL, "seeds": "seeds.txt", "seed_errors": "skip"},
                    run_dir=tmp_path / "run2").run()["taxonomy"]
    assert state["done"]
    report = json.loads((tmp_path / "run2" / "00_taxonomy" / "seeds-report.json").read_text())
    assert [len(r["problems"]) for r in report.values()] == [2]


def test_sharded_growth_gives_the_same_tree(tmp_path, sim):
    """Subtrees grow independently; the new-first-level row still sees every seed name from another shard."""
    _runner(tmp_path, sim, SMALL, run_dir=tmp_path / "one").run()
    state = _runner(tmp_path, sim, SMALL, run_dir=tmp_path / "two", shard_size=2).run()["taxonomy"]
    assert state["shards_total"] == 2
    one = load_stage_output(tmp_path / "one", "taxonomy")["path"]
    two = load_stage_output(tmp_path / "two", "taxonomy")["path"]
    assert sorted(one) == sorted(two)
