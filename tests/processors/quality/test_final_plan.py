"""The final stage's plan: computed once per fingerprint and kept as a file; fingerprints of the paper's
config unchanged; the answer/blind referees validated against the score stage before anything runs."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest

from builder.config import ConfigError
from builder.stage import StageConfig
from processors.pipeline import check_consistency
from processors.referees.settings import RefereeSettings
from processors.stages.final import FinalConfig, FinalStage
from processors.stages.score import ScoreConfig


def test_the_paper_config_keeps_its_old_final_fingerprint():
    stage = FinalStage()
    old_dump = {"threshold": 2, **StageConfig().model_dump(mode="json")}  # Stage.fingerprint_config before
    assert stage.fingerprint_parts(FinalConfig()) == {}
    assert stage.fingerprint_config(FinalConfig()) == old_dump
    assert stage.fingerprint_config(FinalConfig(threshold=3)) == {**old_dump, "threshold": 3}
    # seed and reports change no row unless a balanced selection is on
    assert stage.fingerprint_config(FinalConfig(seed=7, reports=False)) == old_dump
    assert stage.fingerprint_parts(FinalConfig(seed=7)) == {}
    balanced = FinalConfig(target_total=10, seed=7)
    assert stage.fingerprint_config(balanced)["seed"] == 7 and stage.fingerprint_parts(balanced)
    assert stage.fingerprint_config(FinalConfig(target_total=10)) != stage.fingerprint_config(balanced)


def test_the_benchmarks_identity_is_in_the_fingerprint(tmp_path):
    from PIL import Image

    bench = tmp_path / "bench"
    bench.mkdir()
    Image.new("RGB", (8, 8)).save(bench / "a.png")
    config = FinalConfig(decontamination={"benchmark_images": [{"name": "B", "folder": str(bench)}]})
    before = FinalStage().fingerprint_parts(config)
    Image.new("RGB", (9, 8)).save(bench / "b.png")
    assert FinalStage().fingerprint_parts(config) != before  # a new file in the folder
    hub = FinalConfig(decontamination={"benchmark_images": [{"name": "M", "hub": "lmms-lab/MMMU",
                                                             "split": "validation", "revision": "abc"}]})
    other = FinalConfig(decontamination={"benchmark_images": [{"name": "M", "hub": "lmms-lab/MMMU",
                                                               "split": "validation", "revision": "def"}]})
    assert FinalStage().fingerprint_parts(hub) != FinalStage().fingerprint_parts(other)


def _tables():
    score = datasets.Dataset.from_dict({
        "qa_id": ["q1", "q2", "q3"], "image_id": ["i1", "i1", "i2"], "task_type": ["A~x", "A~y", "B~z"],
        "question": ["What?", "Which?", "How?"], "answer": ["a", "b", "c"],
        "votes": [{"r1": 1, "r2": 1}, {"r1": 0, "r2": 1}, {"r1": 1, "r2": 1}],
        "p_yes": [{"r1": 0.9, "r2": 0.8}] * 3, "total": [2, 1, 2], "missing": [[], [], []]})
    images = datasets.Dataset.from_dict({"image_id": ["i1", "i2"], "path": ["images/a.png", "images/b.png"]})
    return {"score": score, "images": images}


def test_the_plan_is_computed_once_and_read_back_by_every_batch_function_and_finalize(tmp_path, monkeypatch):
    tables, calls = _tables(), []
    stage = FinalStage()
    compute = stage._compute_plan
    monkeypatch.setattr(stage, "_compute_plan", lambda config, ctx: calls.append(1) or compute(config, ctx))
    config = FinalConfig(threshold=2)

    def context():  # a fresh context each time, as the engine and the runner build them
        return SimpleNamespace(run_dir=tmp_path, stage_dir=tmp_path / "07_final", cache_dir=tmp_path / "cache",
                               load_stage=tables.__getitem__)

    (tmp_path / "07_final").mkdir()
    batch = tables["score"].to_dict()
    first = stage.make_batch_fn(config, context())(batch)
    second = stage.make_batch_fn(config, context())(batch)  # another worker
    assert first == second
    assert first["__failure_reason"].count("vote_below_threshold") == 1 and first["__failure_reason"].count(None) == 2
    assert stage.plan(config, context()).summary["kept"] == 2  # what finalize reads
    assert len(calls) == 1
    assert (tmp_path / "07_final" / "plan.arrow").exists()
    assert not [p for p in (tmp_path / "07_final").iterdir() if p.name.startswith(".tmp")]
    stage.plan(FinalConfig(threshold=1), context())  # another config: another plan
    assert len(calls) == 2


def _check(final, *referees):
    score = ScoreConfig(referees=list(referees))
    check_consistency(SimpleNamespace(stages=SimpleNamespace(score=score, final=final)))


R1, R2 = RefereeSettings(name="r1", preset="internvl2-26b"), RefereeSettings(name="r2", preset="internvl2-26b")
ANS = RefereeSettings(name="ans", preset="internvl2-26b", see_answer=True)
BLIND = RefereeSettings(name="blind", preset="internvl2-26b", blind=True, see_answer=True)


@pytest.mark.parametrize("final, referees, words", [
    (FinalConfig(threshold=1, answer_referees=["nope"]), (R1, ANS), "answer_referees names 'nope'.*r1, ans"),
    (FinalConfig(threshold=1, blind_referees=["nope"]), (R1, BLIND), "blind_referees names 'nope'"),
    (FinalConfig(threshold=1, answer_referees=["r2"]), (R1, R2), "never see the answer"),
    (FinalConfig(threshold=1, blind_referees=["r2"]), (R1, R2), "blind_referees names 'r2', which see the image"),
    (FinalConfig(threshold=2, answer_referees=["ans"]), (R1, ANS), "threshold is 2.*only 1 referees"),
    (FinalConfig(threshold=1), (R1, BLIND), "not named in stages.final.blind_referees"),
])
def test_answer_and_blind_referees_are_checked_before_anything_runs(final, referees, words):
    with pytest.raises(ConfigError, match=words):
        _check(final, *referees)


def test_a_local_blind_referee_is_refused():
    local = RefereeSettings(name="blind", preset="tiny-random-llava", blind=True, see_answer=True)
    with pytest.raises(ConfigError, match="runs locally"):
        _check(FinalConfig(threshold=1, blind_referees=["blind"]), R1, local)


def test_a_consistent_config_passes():
    _check(FinalConfig(threshold=2, answer_referees=["ans"], blind_referees=["blind"]), R1, R2, ANS, BLIND)
