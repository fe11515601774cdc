"""The whole pipeline through the CLI, offline: run --dry-run, status, export, push --local-dir, load_dataset.

Real parts throughout (simulator over HTTP, tiny random CLIP and Llava, Arrow and Parquet files); only the
Hub's HTTP API is replaced, in the last test, by a recorder — nothing else can stand in for it offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from taskgalaxy import main

from browser_helpers import chromium_browser, skip_reason

SECRET = "sk-test-e2e-must-never-be-written-0123456789"
CONFIG = """
run: {name: e2e, shard_size: 16}
llm:
  endpoints:
    gpt4o: {model: gpt-4o-2024-08-06, image_max_side: 256}
    referee_a: {base_url: "http://localhost:9/v1", api_key_env: null, model: internvl-chat-v1.5}
stages:
  taxonomy: {levels: 2, rounds_per_level: 1, children_per_request: 4, new_first_level_per_round: 2, plots: false}
  images:
    sources: [{type: synthetic, count: 14, seed: 3}]
  match: {model: tg-tiny-clip, pretrained: null, top_k: 6}
  score:
    referees:
      - {name: tiny_llava, preset: tiny-random-llava, batch_size: 8}
      - {name: referee_a, preset: internvl-chat-v1.5, endpoint: {endpoint: referee_a}}
      - {name: referee_b, preset: internvl2-26b, endpoint: {endpoint: referee_a}}
  final: {threshold: 2}
"""
STAGES = ["taxonomy", "images", "match", "filter", "qa", "score", "final"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    config = root / "e2e.yaml"
    config.write_text(CONFIG)
    os.environ["OPENAI_API_KEY"] = SECRET  # a dry run must not need it, and must never write it anywhere
    try:
        assert main(["run", str(config), "--dry-run", "--run-dir", str(root / "run"), "--no-progress"]) == 0
    finally:
        del os.environ["OPENAI_API_KEY"]
    return root


def _status(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == 0
    return {s["stage"]: s for s in json.loads(capsys.readouterr().out)}


def test_every_stage_finishes_and_accounts_for_every_row(finished_run, capsys):
    status = _status(finished_run / "run", capsys)
    assert list(status) == STAGES
    for name, stage in status.items():
        assert stage["done"] and stage["shards_done"] == stage["shards_total"], name
        assert stage["rows_processed"] == stage["rows_in"], name
        assert stage["inputs_with_output"] + stage["failed"] == stage["rows_in"], name
    assert status["images"]["rows_out"] == 14
    assert status["final"]["rows_out"] > 0, "the demo should keep some samples"
    assert status["qa"]["requests"] > 0 and status["filter"]["requests"] == status["match"]["rows_out"]
    report = status["final"]["stats"]
    assert report["coverage"]["leaves"] > 10 and report["coverage"]["stages"]["final"]["rows"] == status["final"]["rows_out"]
    overall = report["agreement"]["overall"]
    assert sum(overall["patterns"].values()) == status["score"]["rows_out"] and len(overall["cohen_kappa"]) == 3


def test_export_is_valid_llava_with_stable_ids(finished_run, capsys):
    out = finished_run / "export" / "data.json"
    assert main(["export", str(finished_run / "run"), "--llava", str(out)]) == 0
    records = json.loads(out.read_text())
    assert records and len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == {"id", "image", "task_type", "conversations"}
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert (out.parent / "images" / record["image"]).resolve().is_file()
    assert (out.parent / "tasktype.txt").read_text().count("\n") > 10
    first = out.read_bytes()
    assert main(["export", str(finished_run / "run"), "--llava", str(out)]) == 0
    assert out.read_bytes() == first


def test_push_to_a_local_folder_loads_every_config_back(finished_run, capsys):
    repo = finished_run / "hub"
    assert main(["push", str(finished_run / "run"), "--local-dir", str(repo)]) == 0
    status = _status(finished_run / "run", capsys)
    for name in STAGES:
        ds = datasets.load_dataset(str(repo), name, split="train")
        assert len(ds) == status[name]["rows_out"], name
    final = datasets.load_dataset(str(repo), split="train")  # `final` is the default config
    assert final[0]["image"].size[0] > 0 and final[0]["conversations"][0]["from"] == "human"
    images = datasets.load_dataset(str(repo), "images", split="train")
    assert images.features["image"] == datasets.Image()
    failures = datasets.load_dataset(str(repo), "failures", split="train")
    assert set(failures["stage"]) <= set(STAGES)
    assert (repo / "llava" / "taskgalaxy_llava.json").exists()
    card = (repo / "README.md").read_text()
    assert "config_name: final" in card and "vote_below_threshold" in card
    # the Hub's metadata (huggingface_hub card data), the quality report and its plots, the sample browser
    from huggingface_hub import DatasetCard

    meta = DatasetCard(card).data
    assert meta.license == "other" and meta.task_categories == ["visual-question-answering", "image-text-to-text"]
    assert meta.size_categories == ["n<1K"] and meta.language == ["en"] and meta.pretty_name
    assert {c["config_name"] for c in meta.configs} == set(STAGES) | {"failures", "trl"}  # trl: issue 23
    assert "### Referee agreement" in card and "### Task coverage" in card
    assert "(plots/quality_votes.png)" in card and (repo / "plots" / "quality_votes.png").is_file()
    page = (repo / "browser" / "index.html").read_text()
    assert all(f'"id": "{record_id}"' in page for record_id in final["id"])
    assert (repo / "reports" / "coverage_per_leaf.csv").is_file()


def test_no_file_of_the_run_or_the_repo_holds_the_api_key(finished_run):
    for path in finished_run.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


def test_push_to_the_hub_uploads_the_same_layout_and_tags_it(finished_run, monkeypatch):
    import huggingface_hub

    calls = []

    def record(name):
        def call(self, *args, **kwargs):
            if name == "upload_folder":  # the folder is temporary: list what would be uploaded
                kwargs["files"] = sorted(str(p.relative_to(kwargs["folder_path"]))
                                         for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file())
            calls.append((name, kwargs))
            return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/datasets/me/tg-demo/commit/abc", commit_message="m",
                                              commit_description="", oid="abc")
        return call

    for name in ("create_repo", "upload_folder", "create_tag"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    assert main(["push", str(finished_run / "run"), "--repo-id", "me/tg-demo", "--tag", "v1"]) == 0
    names = [name for name, _ in calls]
    assert names == ["create_repo", "upload_folder", "create_tag"]
    local = finished_run / "hub-compare"
    assert main(["push", str(finished_run / "run"), "--local-dir", str(local)]) == 0
    assert calls[1][1]["files"] == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert calls[2][1]["tag"] == "v1" and calls[2][1]["revision"] == "abc"


def test_a_real_run_without_its_api_key_stops_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = tmp_path / "real.yaml"
    config.write_text(CONFIG)
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stages.qa calls llm.endpoints.gpt4o, whose key is read from $OPENAI_API_KEY" in err
    assert not (tmp_path / "run").exists()


def test_estimate_projects_requests_and_cost_before_anything_runs(tmp_path, capsys):
    config = tmp_path / "real.yaml"
    config.write_text(CONFIG)
    assert main(["estimate", str(config), "--images", "1000"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["filter"][1] == "1,000"  # one request per image
    assert lines["qa"][1] == f"{round(1000 * 0.85 * 1.02):,}"  # images keeping a type, plus expected repairs
    assert float(lines["total"][-1].replace(",", "")) > 0
    assert "score:referee_a" in lines and "tiny_llava runs locally" in " ".join(" ".join(v) for v in lines.values())
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_the_audit_loop_on_the_demo_run_in_chromium(finished_run, tmp_path, capsys):
    """Issue 25's loop on a real dry run: sample -> label in a real browser -> figures -> the card."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)  # the other tests' card has no audit section
    assert main(["audit", str(run), "--sample", "10", "--out", str(tmp_path / "page"), "--stratify", "votes"]) == 0
    sampled = [json.loads(line) for line in (tmp_path / "page" / "sample.jsonl").read_text().splitlines()]
    assert {row["kept"] for row in sampled} == {True, False}  # dropped questions too, so recall can be measured
    with chromium_browser() as browser:
        page = browser.new_context(accept_downloads=True).new_page()
        page.goto((tmp_path / "page" / "index.html").as_uri())
        assert page.locator("#picture").get_attribute("src").startswith("data:image/")
        for i in range(len(sampled)):  # fits; the answer right except every third; needs the image
            page.keyboard.press("1")
            page.keyboard.press("w" if i % 3 == 0 else "q")
            page.keyboard.press("a")
            page.keyboard.press("j")
        with page.expect_download() as download:
            page.click("#download")
        download.value.save_as(tmp_path / "labels.json")
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert len(labels) == len(sampled) and {row["qa_id"] for row in labels} == {row["qa_id"] for row in sampled}
    capsys.readouterr()
    assert main(["audit", str(run), "--labels", str(tmp_path / "labels.json"), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["labelled"] == len(sampled)
    assert main(["push", str(run), "--local-dir", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "Human audit" in card
