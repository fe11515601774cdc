"""The audit's sample (issue 25, item 1): drawn from every scored question, kept and dropped, deterministic for
(run, n, stratify, seed) and blind to row order, with the dropped side's fair share, every stratum present
where n allows, and the stratum sizes of the whole run recorded for reweighting.

``make_run`` writes a tiny finished run folder (images, score, final with its failures) the way the stages
leave one; the page's tests (``test_audit_page.py``) build theirs with it too.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from builder.accounting import FAILURE_FEATURES
from builder.arrowfiles import write_arrow_table
from processors.quality.audit_sample import (AUDIT_DIR, MANIFEST_FILE, SAMPLE_FILE, STRATIFY, allocate, draw_sample,
                                             population, stratum_of, write_audit)

REFEREES = ("referee_alpha", "referee_beta", "referee_gamma")
CHECK = "answer_check"  # an answer referee of the final stage: its vote is no part of the protocol's total
CATEGORIES = {"OCR": 14, "Counting": 9, "Spatial": 5, "Charts": 2}  # questions per first-level category


def _write_stage(run: Path, index: int, name: str, columns: dict, features: datasets.Features,
                 config: dict | None = None, failures: list[dict] | None = None) -> None:
    """One finished shard of a stage, its failures and a ``state.json`` as the runner writes them."""
    folder = run / f"{index:02d}_{name}"
    (folder / "failures").mkdir(parents=True)
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    write_arrow_table(folder / "shard-00000.arrow", table, features)
    rows = {k: [f.get(k) for f in failures or []] for k in FAILURE_FEATURES}
    write_arrow_table(folder / "failures" / "shard-00000.arrow",
                      datasets.Dataset.from_dict(rows, features=FAILURE_FEATURES).data.table, FAILURE_FEATURES)
    state = {"stage": name, "fingerprint": f"{name}-fingerprint", "shards_total": 1, "shards_done": 1,
             "done": True, "features": features.to_dict(), "config": config or {}}
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")


def make_run(root: Path, texts: dict[int, tuple[str, str]] | None = None, categories: dict[str, int] = CATEGORIES,
             final: bool = True) -> Path:
    """A finished run: one image per two questions (two sources), three counting referees plus an answer
    check, kept = at least 2 counting votes. ``texts``: question index -> (question, answer) to plant."""
    run = root / "run"
    kinds = [(cat, j) for cat, count in categories.items() for j in range(count)]
    image_ids = [f"img{i // 2:04d}" for i in range(len(kinds))]
    for k, image_id in enumerate(sorted(set(image_ids))):
        file = run / "images" / image_id[:2] / f"{image_id}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (40 + 7 * k % 200, 120, 200 - 5 * k % 150)).save(file)
    images = sorted(set(image_ids))
    _write_stage(run, 1, "images", {
        "image_id": images, "path": [f"store/{i[:2]}/{i}.png" for i in images],
        "source": ["web" if n % 3 else "charts" for n in range(len(images))]},
        datasets.Features({c: datasets.Value("string") for c in ("image_id", "path", "source")}))
    (run / "01_images" / "image_roots.json").write_text(json.dumps({"store": {"relative_to_run": "images"}}))
    votes = [{name: int((i * 7 + r * 3) % 5 < 3) for r, name in enumerate(REFEREES)} | {CHECK: i % 2}
             for i in range(len(kinds))]
    qa_ids = [f"qa{i:04d}" for i in range(len(kinds))]
    texts = texts or {}
    questions = [texts.get(i, (f"Question {i}?", ""))[0] for i in range(len(kinds))]
    answers = [texts.get(i, ("", f"Answer {i}."))[1] for i in range(len(kinds))]
    vote = datasets.Value("int8")
    _write_stage(run, 5, "score", {
        "qa_id": qa_ids, "image_id": image_ids, "task_type": [f"{c}~{c} level two~leaf {j % 3}" for c, j in kinds],
        "question": questions, "answer": answers, "votes": votes, "total": [sum(v.values()) for v in votes],
        "p_yes": [{name: 0.2 + 0.6 * value for name, value in v.items()} for v in votes], "missing": [[]] * len(votes)},
        datasets.Features({**{c: datasets.Value("string") for c in ("qa_id", "image_id", "task_type", "question",
                                                                     "answer")},
                           "votes": {name: vote for name in (*REFEREES, CHECK)}, "total": datasets.Value("int32"),
                           "p_yes": {name: datasets.Value("float32") for name in (*REFEREES, CHECK)},
                           "missing": datasets.List(datasets.Value("string"))}))
    if final:
        kept = [i for i, v in enumerate(votes) if sum(v[name] for name in REFEREES) >= 2]
        _write_stage(run, 6, "final", {"qa_id": [qa_ids[i] for i in kept], "id": [f"tg-{qa_ids[i]}" for i in kept]},
                     datasets.Features({"qa_id": datasets.Value("string"), "id": datasets.Value("string")}),
                     config={"threshold": 2, "answer_referees": [CHECK], "blind_referees": []},
                     failures=[{"key": qa_ids[i], "stage": "final", "reason": "vote_below_threshold", "detail": "x"}
                               for i in range(len(kinds)) if i not in kept])
    # the config the runner copies into every run folder (the audit's figures read the final stage's checks)
    (run / "config.yaml").write_text(f"run: {{name: audit-test}}\nstages:\n  final: {{threshold: 2, "
                                     f"answer_referees: [{CHECK}]}}\n", encoding="utf-8")
    return run


@pytest.fixture()
def run(tmp_path) -> Path:
    return make_run(tmp_path)


def _rows(kept: int, dropped: int, categories=("A", "B", "C")) -> list[dict]:
    return [{"qa_id": f"{side}-{i}", "kept": side == "k", "category": categories[i % len(categories)],
             "source": "s", "votes_total": 0} for side, count in (("k", kept), ("d", dropped)) for i in range(count)]


# -- the population ------------------------------------------------------------------------------------------
def test_the_population_is_every_scored_question_with_what_the_audit_needs(run):
    rows = population(run)
    assert len(rows) == sum(CATEGORIES.values()) and len({r["qa_id"] for r in rows}) == len(rows)
    first = rows[0]
    assert first["category"] == "OCR" and first["task_type"].startswith("OCR~")
    assert first["votes_total"] == sum(first["votes"][name] for name in REFEREES)  # the answer check left out
    assert all(r["kept"] == (r["votes_total"] >= 2) for r in rows)
    assert {r["drop_reason"] for r in rows if not r["kept"]} == {"vote_below_threshold"}
    assert {r["drop_reason"] for r in rows if r["kept"]} == {None}
    assert {r["source"] for r in rows} == {"web", "charts"}
    assert all(Path(r["image"]).is_file() for r in rows)
    assert 0 < sum(r["kept"] for r in rows) < len(rows)  # both sides exist


def test_a_run_without_a_final_stage_says_what_to_run(tmp_path):
    run = make_run(tmp_path, final=False)
    with pytest.raises(ValueError, match="stage 'final' has not run.*taskgalaxy run CONFIG --stages final"):
        population(run)
    with pytest.raises(ValueError, match="stage 'score' has not run"):
        population(tmp_path / "empty")


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_the_sample_size_must_be_at_least_one(n):
    with pytest.raises(ValueError, match="at least 1"):
        draw_sample(_rows(5, 5), n)


def test_an_unknown_stratify_key_is_refused():
    with pytest.raises(ValueError, match="category, source, votes"):
        draw_sample(_rows(5, 5), 3, stratify="colour")


# -- determinism ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stratify", STRATIFY)
def test_the_sample_depends_on_the_seed_not_on_row_order(run, stratify):
    rows = population(run)
    first = draw_sample(rows, 10, stratify, seed=3)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert draw_sample(shuffled, 10, stratify, seed=3) == first
    assert draw_sample(rows, 10, stratify, seed=3) == first
    other = draw_sample(rows, 10, stratify, seed=4)
    assert {r["qa_id"] for r in other} != {r["qa_id"] for r in first}


def test_the_sample_mixes_kept_and_dropped_in_its_order(run):
    sample = draw_sample(population(run), 12)
    sides = "".join("k" if r["kept"] else "d" for r in sample)
    assert "kd" in sides and "dk" in sides  # not all kept first: the order tells the person nothing


# -- allocation ----------------------------------------------------------------------------------------------
def test_the_dropped_side_gets_at_least_a_third():
    for n in (1, 2, 3, 7, 10, 30, 61):
        sample = draw_sample(_rows(90, 10), n)
        dropped = sum(not r["kept"] for r in sample)
        assert len(sample) == n
        assert dropped >= min(10, math.ceil(n / 3)) - (n == 1), n  # n == 1: the one question is a kept one


def test_the_kept_side_keeps_a_third_when_the_referees_drop_most():
    sample = draw_sample(_rows(6, 300), 30)
    assert sum(r["kept"] for r in sample) == 6  # all of them: fewer than a third of 30
    sample = draw_sample(_rows(40, 300), 30)
    assert sum(r["kept"] for r in sample) == 10


def test_the_shares_are_proportional_beyond_the_floors():
    shares = allocate({"kept/A": 600, "kept/B": 300, "kept/C": 100, "dropped/A": 500, "dropped/B": 500}, 40)
    assert sum(shares.values()) == 40
    assert shares["kept/A"] > shares["kept/B"] > shares["kept/C"] >= 1
    assert abs(shares["dropped/A"] - shares["dropped/B"]) <= 1


@pytest.mark.parametrize("stratify", STRATIFY)
def test_every_stratum_is_sampled_where_n_allows_and_sizes_match_the_population(run, stratify):
    rows = population(run)
    sizes = Counter(stratum_of(r, stratify) for r in rows)
    sample = draw_sample(rows, len(sizes) + 3, stratify)
    assert len(sample) == len(sizes) + 3
    assert set(Counter(r["stratum"] for r in sample)) == set(sizes)
    taken = Counter(r["stratum"] for r in sample)
    for record in sample:
        assert record["stratum_population"] == sizes[record["stratum"]]
        assert record["stratum_sampled"] == taken[record["stratum"]] <= record["stratum_population"]
        assert record["kept"] == record["stratum"].startswith("kept/")
        assert set(record) == {"qa_id", "stratum", "kept", "stratum_population", "stratum_sampled"}


def test_fewer_draws_than_strata_go_to_the_largest():
    shares = allocate({"kept/A": 50, "kept/B": 5, "kept/C": 1, "dropped/A": 40, "dropped/B": 2}, 3)
    assert shares == {"kept/A": 1, "kept/B": 1, "kept/C": 0, "dropped/A": 1, "dropped/B": 0}


def test_n_larger_than_the_population_takes_all_of_it(run, tmp_path):
    rows = population(run)
    sample = draw_sample(rows, 10_000)
    assert sorted(r["qa_id"] for r in sample) == sorted(r["qa_id"] for r in rows)
    assert all(r["stratum_sampled"] == r["stratum_population"] for r in sample)
    manifest = write_audit(run, 10_000, tmp_path / "page")
    assert manifest["whole_population"] and manifest["sampled"] == manifest["population"] == len(rows)


# -- what write_audit leaves behind ---------------------------------------------------------------------------
def test_write_audit_records_the_sample_and_its_strata(run, tmp_path):
    manifest = write_audit(run, 9, tmp_path / "page", stratify="source", seed=2)
    lines = (tmp_path / "page" / SAMPLE_FILE).read_text(encoding="utf-8")
    assert (run / AUDIT_DIR / SAMPLE_FILE).read_text(encoding="utf-8") == lines
    sample = [json.loads(line) for line in lines.splitlines()]
    assert sample == draw_sample(population(run), 9, "source", 2)
    stored = json.loads((run / AUDIT_DIR / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert stored == manifest
    assert {"audit_id", "seed", "stratify", "n", "strata", "created"} <= set(manifest)
    assert (manifest["seed"], manifest["stratify"], manifest["n"]) == (2, "source", 9)
    assert sum(s["population"] for s in manifest["strata"].values()) == len(population(run))
    assert sum(s["sampled"] for s in manifest["strata"].values()) == 9
    assert all(s["kept"] == name.startswith("kept/") for name, s in manifest["strata"].items())
    # the same audit written again keeps its id (a person's saved progress), another seed gets a new one
    assert write_audit(run, 9, tmp_path / "again", stratify="source", seed=2)["audit_id"] == manifest["audit_id"]
    assert write_audit(run, 9, tmp_path / "other", stratify="source", seed=3)["audit_id"] != manifest["audit_id"]
    assert json.loads((run / AUDIT_DIR / MANIFEST_FILE).read_text())["seed"] == 3  # the latest audit


# -- review (issue 25 follow-up): where the page may go, missing pictures, cost ------------------------------------
def test_out_must_be_a_folder_outside_the_run(run, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("mine")
    for out, message in ((file, "is a file, not a folder"), (run, "inside the run folder"),
                         (run / "05_score" / "page", "inside the run folder"),
                         (run / AUDIT_DIR, "inside the run folder")):
        with pytest.raises(ValueError, match=message):
            write_audit(run, 5, out)
    assert file.read_text() == "mine" and not (run / "index.html").exists() and not (run / AUDIT_DIR).exists()


def test_a_users_own_index_html_is_not_replaced_but_an_earlier_audit_page_is(run, tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "index.html").write_text("<h1>my own page</h1>")
    with pytest.raises(ValueError, match="not a TaskGalaxy audit page"):
        write_audit(run, 5, out)
    assert (out / "index.html").read_text() == "<h1>my own page</h1>" and not (out / SAMPLE_FILE).exists()
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / SAMPLE_FILE).write_text("someone's notes\n")
    with pytest.raises(ValueError, match="beside no audit page"):
        write_audit(run, 5, stray)
    page = tmp_path / "page"
    first = write_audit(run, 5, page)
    second = write_audit(run, 6, page)  # drawing again into the same folder replaces the earlier page
    assert first["audit_id"] != second["audit_id"] and second["audit_id"] in (page / "index.html").read_text()


def test_missing_images_still_give_the_page_and_are_named(run, tmp_path):
    for file in (run / "images").rglob("*.png"):
        file.unlink()
    manifest = write_audit(run, 6, tmp_path / "page")
    assert (tmp_path / "page" / "index.html").exists()
    sampled = [json.loads(line)["qa_id"] for line in (tmp_path / "page" / SAMPLE_FILE).read_text().splitlines()]
    assert manifest["no_picture"] == sampled
    assert json.loads((run / AUDIT_DIR / MANIFEST_FILE).read_text())["no_picture"] == sampled


def test_write_audit_resolves_the_sampled_images_only(run, tmp_path, monkeypatch):
    # a realpath walk per image of the whole run was most of the time on 200k rows (seconds of lstat)
    import processors.quality.audit_sample as audit_sample

    calls = []
    real = audit_sample.resolve_image_path
    monkeypatch.setattr(audit_sample, "resolve_image_path", lambda *a: calls.append(a[1]) or real(*a))
    write_audit(run, 3, tmp_path / "page")
    assert 1 <= len(calls) <= 3
    assert population(run)[0]["image"] is not None and "stored_path" not in population(run)[0]
