"""The images stage end to end through the Runner: mixed sources, hostile files, dedup across sources and
shards, URL downloads from a local server, a crash mid-stage and the resume after it."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
from pathlib import Path

import datasets
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loaders"))  # the local HTTP server helper

from builder.config import build_config_model, validate_config  # noqa: E402
from builder.outputs import load_stage_failures, load_stage_output  # noqa: E402
from builder.engine import LocalEngine  # noqa: E402
from builder.runner import Runner, StageError  # noqa: E402
from builder.status import stage_summaries  # noqa: E402
from loaders.images.paths import resolve_image_path  # noqa: E402
from loaders.images.synthetic import synthetic_image  # noqa: E402
from local_http import LocalServer  # noqa: E402
import processors.stages.images as images_module  # noqa: E402
from processors.stages.images import ImagesStage  # noqa: E402

STAGES = [ImagesStage()]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def picture(seed: int) -> Image.Image:
    return Image.effect_mandelbrot((96, 64), (-2 + seed * 0.1, -1, 1, 1), 50).convert("RGB")


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(picture(1)))
    (folder / "b.jpg").write_bytes(encode(picture(2), "JPEG"))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_bytes(b"<html><body>Forbidden</body></html>")
    (folder / "cut.png").write_bytes(encode(picture(3))[:400])
    (folder / "strip.png").write_bytes(encode(Image.new("L", (1, 2000))))
    (folder / "synthetic-copy.png").write_bytes(synthetic_image(0, 0, (128, 96)))
    hub = datasets.Dataset.from_dict({"image": [{"bytes": encode(picture(4)), "path": None},
                                                {"bytes": encode(picture(1)), "path": None}]},
                                     features=datasets.Features({"image": datasets.Image()}))
    hub.save_to_disk(str(tmp_path / "hubset"))
    images = {"c.jpg": encode(picture(5), "JPEG"), "a-again.png": encode(picture(1))}
    with LocalServer(images=images) as server:
        (tmp_path / "urls.txt").write_text("\n".join(
            [server.url("img/c.jpg"), server.url("img/missing.jpg"), server.url("img/a-again.png")]))
        yield tmp_path, server


def config(base: Path, **images):
    stages = {"images": {
        "sources": [
            {"type": "folder", "root": "photos"},
            {"type": "hub", "path": "hubset", "name": "hub"},
            {"type": "urls", "file": "urls.txt"},
            {"type": "synthetic", "count": 3, "size": [128, 96]},
        ],
        "download": {"allowed_networks": ["127.0.0.1/32"], "retries": 0},
        "workers": 2,
        **images,
    }}
    return validate_config({"run": {"name": "t", "shard_size": 4}, "stages": stages},
                           build_config_model(STAGES), base_dir=base)


def run(base: Path, run_dir: Path, **images):
    return Runner(STAGES, config(base, **images), run_dir, progress=False).run()["images"]


def outcome(run_dir: Path):
    out = load_stage_output(run_dir, "images").to_list()
    failures = load_stage_failures(run_dir, "images").to_list()
    return sorted((r["ref"], r["image_id"], r["path"]) for r in out), sorted((f["key"], f["reason"]) for f in failures)


def test_mixed_sources_end_to_end(corpus):
    base, server = corpus
    state = run(base, base / "run")
    totals = state["totals"]
    assert totals["rows_in"] == 15 and totals["rows_out"] + sum(totals["failed"].values()) == 15
    rows, failures = outcome(base / "run")
    assert dict(failures) == {
        "photos/cut.png": "image_truncated",
        "photos/empty.jpg": "image_empty",
        "photos/page.jpg": "image_not_image",
        "photos/strip.png": "image_too_small",
        "hub#1": "duplicate",  # same bytes as photos/a.png, another source
        "urls#1": "download_http_error",
        "urls#2": "duplicate",
        "synthetic#00000": "duplicate",  # its bytes were already in the folder
    }
    detail = {f["key"]: f["detail"] for f in load_stage_failures(base / "run", "images").to_list()}
    assert "photos/a.png" in detail["urls#2"] and "photos/synthetic-copy.png" in detail["synthetic#00000"]
    for ref, image_id, path in rows:  # every path resolves inside its root to the very bytes hashed
        file = resolve_image_path(base / "run", path)
        assert hashlib.sha256(file.read_bytes()).hexdigest()[:32] == image_id
    by_ref = {ref: path for ref, _, path in rows}
    assert by_ref["photos/a.png"] == "photos/a.png" and by_ref["urls#0"].startswith("store/")
    hits = dict(server.hits)
    again = run(base, base / "run")  # a finished stage: nothing recomputed, nothing downloaded again
    assert again["totals"] == totals and dict(server.hits) == hits


def test_crash_mid_stage_then_resume_matches_a_clean_run(corpus, monkeypatch):
    base, server = corpus
    real = images_module.check_image
    calls = {"n": 0}

    def crashing(data, limits, name="image"):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("simulated crash")
        return real(data, limits, name=name)

    monkeypatch.setattr(images_module, "check_image", crashing)
    monkeypatch.setattr(ImagesStage, "batch_size", 2)  # the crash lands after the ledger committed a batch
    with pytest.raises(StageError, match="simulated crash"):
        run(base, base / "crashed")
    monkeypatch.setattr(images_module, "check_image", real)
    assert run(base, base / "crashed")["done"]
    run(base, base / "clean")
    assert outcome(base / "crashed") == outcome(base / "clean")


class ReversedEngine(LocalEngine):
    """Runs the shards, then hands them to the runner last first: the order a parallel run may finish in."""

    def run_shards(self, *args, **kwargs):
        yield from reversed(list(super().run_shards(*args, **kwargs)))


@pytest.mark.parametrize("near", ["report", "drop"])
def test_shards_finishing_in_any_order_give_the_serial_output(corpus, near):
    """Duplicates and near duplicates span shards (same bytes from a folder, a Hub set and a URL; a resized
    copy): the settle step decides them in input order, whichever shard finished first."""
    base, _ = corpus
    (base / "photos" / "z-near.jpg").write_bytes(encode(picture(1).resize((192, 128)), "JPEG"))
    cfg = config(base, near_duplicates={"mode": near}, parallel_shards=1)
    serial = Runner(STAGES, cfg, base / "serial", progress=False).run()["images"]
    cfg = config(base, near_duplicates={"mode": near}, parallel_shards=3)
    reversed_ = Runner(STAGES, cfg, base / "reversed", progress=False, engine=ReversedEngine()).run()["images"]
    assert serial["shards_total"] == reversed_["shards_total"] == 4
    assert outcome(base / "reversed") == outcome(base / "serial")
    for name in ("images",):  # the very rows, in the same order, with the same failure details
        assert load_stage_output(base / "reversed", name).to_list() == load_stage_output(base / "serial", name).to_list()
        assert load_stage_failures(base / "reversed", name).to_list() == \
            load_stage_failures(base / "serial", name).to_list()
    assert serial["totals"]["usage"]["near_duplicates"] == reversed_["totals"]["usage"]["near_duplicates"] >= 1
    assert serial["fingerprint"] == reversed_["fingerprint"]  # parallel_shards is parallelism only


def test_a_crash_after_a_download_does_not_download_it_again(corpus, monkeypatch):
    base, server = corpus
    real = images_module.check_image

    def crashing(data, limits, name="image"):
        if name.endswith("a-again.png"):  # urls#2: the batch before it (hub#1, urls#0) is done
            raise RuntimeError("simulated crash")
        return real(data, limits, name=name)

    monkeypatch.setattr(images_module, "check_image", crashing)
    monkeypatch.setattr(ImagesStage, "batch_size", 2)
    with pytest.raises(StageError, match="simulated crash"):
        run(base, base / "crashed", parallel_shards=1)
    assert server.hits["c.jpg"] == 1
    monkeypatch.setattr(images_module, "check_image", real)
    assert run(base, base / "crashed")["done"]
    assert server.hits["c.jpg"] == 1  # read from the store, where the interrupted pass put it
    assert not (base / "crashed" / "01_images" / images_module.DOWNLOADS_DIR).exists()  # gone once finished
    run(base, base / "clean")
    assert outcome(base / "crashed") == outcome(base / "clean")


def test_near_duplicates_reported_or_dropped(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "1.png").write_bytes(encode(picture(1)))
    (folder / "2.jpg").write_bytes(encode(picture(1).resize((192, 128)), "JPEG"))
    (folder / "3.png").write_bytes(encode(picture(9).transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
    model = build_config_model(STAGES)
    for mode in ("report", "drop"):
        cfg = validate_config({"run": {"name": "t"}, "stages": {"images": {
            "sources": [{"type": "folder", "root": "photos"}], "near_duplicates": {"mode": mode}}}},
            model, base_dir=tmp_path)
        state = Runner(STAGES, cfg, tmp_path / mode, progress=False).run()["images"]
        assert state["totals"]["usage"]["near_duplicates"] == 1
        rows = {r["ref"]: r for r in load_stage_output(tmp_path / mode, "images").to_list()}
        if mode == "report":
            assert rows["photos/2.jpg"]["near_dup_of"] == rows["photos/1.png"]["image_id"]
            assert rows["photos/3.png"]["near_dup_of"] is None
        else:
            assert "photos/2.jpg" not in rows and state["totals"]["failed"] == {"near_duplicate": 1}


def folder_config(base: Path, **images):
    return validate_config({"run": {"name": "t"}, "stages": {"images": {
        "sources": [{"type": "folder", "root": "photos"}], **images}}}, build_config_model(STAGES), base_dir=base)


def test_memory_budget_lets_large_images_decode_one_at_a_time(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):  # 9 MB of pixels each (+16 MB of hash work): above a 16 MB budget, so one at a time
        Image.new("L", (3000, 3000), 30 * i).save(folder / f"{i}.png")
    real, lock, active = images_module.check_image, threading.Lock(), {"now": 0, "most": 0}

    def counting(data, limits, name="image"):
        with lock:
            active["now"] += 1
            active["most"] = max(active["most"], active["now"])
        try:
            return real(data, limits, name=name)
        finally:
            with lock:
                active["now"] -= 1

    monkeypatch.setattr(images_module, "check_image", counting)
    Runner(STAGES, folder_config(tmp_path, workers=4, memory_budget_mb=16), tmp_path / "tight", progress=False).run()
    assert active["most"] == 1
    Runner(STAGES, folder_config(tmp_path, workers=4, memory_budget_mb=4096), tmp_path / "roomy", progress=False).run()
    assert outcome(tmp_path / "tight") == outcome(tmp_path / "roomy")  # it orders the work, never a verdict
    stage = ImagesStage()
    assert stage.fingerprint_config(folder_config(tmp_path, memory_budget_mb=16).stages.images) == \
        stage.fingerprint_config(folder_config(tmp_path).stages.images)


def test_listing_counts_hidden_files_and_everything_else_it_passes_over(tmp_path):
    folder = tmp_path / "photos"
    (folder / ".thumbnails").mkdir(parents=True)
    (folder / "a.png").write_bytes(encode(picture(1)))
    (folder / ".hidden.png").write_bytes(encode(picture(2)))
    (folder / "._a.png").write_bytes(b"AppleDouble")
    (folder / ".thumbnails" / "a.png").write_bytes(encode(picture(1)))
    (folder / "notes.txt").write_text("not an image")
    Runner(STAGES, folder_config(tmp_path), tmp_path / "run", progress=False).run()
    expected = {"type": "folder", "references": 1, "cut_by_limit": 0,
                "skipped": {"hidden_file": 2, "hidden_folder": 1, "other_extension": 1}}
    stats = json.loads(next((tmp_path / "run").glob("*_images/stats.json")).read_text())
    assert stats == {"listing": {"photos": expected}}
    assert stage_summaries(tmp_path / "run")[0]["stats"] == stats  # what `taskgalaxy status --json` shows
