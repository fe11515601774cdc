"""Decontamination's perceptual-hash near-copy check (``near_hash_distance``): the images stage's dHash, no model
and no GPU. Real pictures (matplotlib's sample photos and rendered charts) and planted copies: resized,
re-encoded, converted and slightly cropped copies are caught; distinct images, and plain images whose hash says
nothing, are not."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from loaders.images.dedup import hamming
from processors.image_validate import ImageLimits, check_image
from processors.quality import decontam, decontam_clip
from processors.quality.decontam import _image_matches, benchmark_hashes, fired_checks, image_hashes, phash_matches
from processors.quality.decontam_config import DecontaminationConfig
from processors.stages.final import FinalConfig, FinalStage

SUGGESTED = 6  # the distance near_hash_distance's description suggests
PHASH_ONLY = DecontaminationConfig(near_threshold=None, near_hash_distance=SUGGESTED)


def _sample(name: str) -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data(name) as handle:
        return Image.open(handle).convert("RGB")


def _relief(array) -> Image.Image:
    array = np.asarray(array, dtype=np.float64)
    return Image.fromarray((255 * (array - array.min()) / np.ptp(array)).astype(np.uint8)).convert("RGB")


def _chart(draw) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(4, 3), dpi=60)
    draw(figure.add_subplot())
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def pictures() -> dict[str, Image.Image]:
    from matplotlib import cbook

    rng = np.random.default_rng(0)
    x = np.linspace(0, 10, 100)
    return {
        # planted in the benchmark: real photos, a terrain relief, smooth colour noise and a chart
        "hopper": _sample("grace_hopper.jpg").resize((256, 300)),
        "minduka": _sample("Minduka_Present_Blue_Pack.png"),
        "relief": _relief(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]),
        "noise": Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((240, 180),
                                                                                        Image.Resampling.BICUBIC),
        "bars": _chart(lambda ax: ax.bar(range(6), [3, 1, 4, 1, 5, 9])),
        # distinct, never in the benchmark: another photo-like picture, a logo, another chart
        "topo": _relief(cbook.get_sample_data("topobathy.npz")["topo"]),
        "logo": _sample("logo2.png"),
        "line": _chart(lambda ax: ax.plot(x, np.sin(x))),
    }


PLANTED = ("hopper", "minduka", "relief", "noise", "bars")
DISTINCT = ("topo", "logo", "line")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _copies(image: Image.Image) -> dict[str, bytes]:
    w, h = image.size
    return {
        "half": _encode(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS), "PNG"),
        "double": _encode(image.resize((w * 2, h * 2), Image.Resampling.BICUBIC), "PNG"),
        "jpeg_q60": _encode(image, "JPEG", quality=60),
        "png_to_jpeg": _encode(Image.open(io.BytesIO(_encode(image, "PNG"))), "JPEG", quality=90),
        "crop_2px": _encode(image.crop((2, 2, w - 2, h - 2)), "PNG"),
    }


def _stage_phash(data: bytes) -> int:
    """The images stage's ``phash`` of these bytes (check_image under its default limits), as its column holds."""
    check = check_image(data, ImageLimits())
    assert check.ok, check.detail
    return int(f"{check.phash:016x}", 16)


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


@pytest.fixture(scope="module")
def planted(pictures, tmp_path_factory):
    """A benchmark folder of the planted pictures, and our images: their copies and the distinct pictures."""
    root = tmp_path_factory.mktemp("planted")
    bench = [("Bench", _write(root / "bench", f"{name}.png", _encode(pictures[name], "PNG"))) for name in PLANTED]
    images, phashes = {}, {}
    for name in PLANTED:
        for kind, data in _copies(pictures[name]).items():
            image_id = f"{name}/{kind}"
            images[image_id] = _write(root / "run", image_id.replace("/", "-") + (".jpg" if "jpeg" in kind else
                                                                                   ".png"), data)
            phashes[image_id] = _stage_phash(data)
    for name in DISTINCT:
        data = _encode(pictures[name], "JPEG", quality=85)
        images[name] = _write(root / "run", f"{name}.jpg", data)
        phashes[name] = _stage_phash(data)
    return bench, images, phashes


def test_planted_near_copies_are_caught_and_distinct_pictures_are_not(planted):
    bench, images, phashes = planted
    found = _image_matches(images, bench, PHASH_ONLY, None, phashes=phashes)  # no ctx: no model is touched
    copies = [i for i in images if "/" in i]
    assert sorted(found) == sorted(copies), {i: found.get(i) for i in images}
    for image_id in copies:
        detail = found[image_id]
        assert fired_checks(detail) == ["phash"]
        assert f"from Bench: {image_id.split('/')[0]}.png" in detail  # names the benchmark image
        bits = int(detail.split("phash: ")[1].split(" of 64")[0])
        assert bits <= SUGGESTED
    assert not set(DISTINCT) & set(found)


def test_measured_distances_copies_against_distinct_pictures(pictures, planted):
    """The numbers behind the suggested distance: copies 0-6 bits, distinct pictures far apart (measured with
    Pillow 13: copies at most 3 bits here, distinct pairs at least 22)."""
    bench, _, phashes = planted
    theirs = {path.stem: image_hashes(path)[1] for _, path in bench}
    copies = {i: hamming(h, theirs[i.split("/")[0]]) for i, h in phashes.items() if "/" in i}
    everything = {**theirs, **{n: phashes[n] for n in DISTINCT}}
    distinct = {(a, b): hamming(everything[a], everything[b]) for a, b in itertools.combinations(everything, 2)}
    print("copies:", copies, "\ndistinct:", sorted(distinct.values()))
    assert max(copies.values()) <= SUGGESTED
    assert min(distinct.values()) >= 2 * SUGGESTED


def test_plain_images_are_no_evidence(tmp_path):
    """A blank page, a plain gradient and a line of text on white have near-flat hashes (0 for the first two):
    they would all match one another, so neither side's near-flat hash takes part."""
    from PIL import ImageDraw

    def text(line: str) -> Image.Image:
        page = Image.new("RGB", (320, 120), "white")
        ImageDraw.Draw(page).text((10, 50), line, fill="black", font_size=18)
        return page

    ramp = np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (150, 1))
    bench = [("Bench", _write(tmp_path / "bench", "blank.png", _encode(Image.new("RGB", (200, 150), "white"), "PNG"))),
             ("Bench", _write(tmp_path / "bench", "text.png", _encode(text("Which option is correct?"), "PNG")))]
    gradient = Image.fromarray(ramp).convert("RGB")
    images = {"gradient": _write(tmp_path / "run", "gradient.png", _encode(gradient, "PNG")),
              "grey": _write(tmp_path / "run", "grey.jpg", _encode(Image.new("RGB", (90, 60), "#bbbbbb"), "JPEG")),
              "text": _write(tmp_path / "run", "text.png", _encode(text("Which colour is the car?"), "PNG"))}
    ours = {i: image_hashes(p)[1] for i, p in images.items()}
    theirs = [image_hashes(p)[1] for _, p in bench]
    assert ours["gradient"] == ours["grey"] == theirs[0] == 0  # dHash cannot tell them apart
    assert ours["text"] == theirs[1]  # nor two different lines of text (4 bits set each)
    assert _image_matches(images, bench, PHASH_ONLY, None) == {}
    assert phash_matches({"a": 0b1111 << 30}, [0b1111 << 31], 16) == {}  # 4 bits set: near-flat at any distance


def test_exact_pixels_still_come_first_and_our_hash_is_taken_from_the_decode_when_the_stage_has_none(planted):
    bench, images, _ = planted
    same = {"same": bench[0][1], "half": images["hopper/half"]}
    found = _image_matches(same, bench, PHASH_ONLY, None)  # no stage phash: hashed from the exact check's decode
    assert found["same"] == "same pixels as Bench: hopper.png" and fired_checks(found["same"]) == ["pixels"]
    assert fired_checks(found["half"]) == ["phash"]


def test_both_checks_record_which_fired(planted, monkeypatch):
    bench, images, phashes = planted
    ids = ["hopper/half", "topo"]

    def clip(rest, images_, chosen, config, ctx):  # the CLIP check's result, without weights
        assert config.near_threshold == 0.9 and set(rest) == set(ids)
        return {"hopper/half": (*chosen[0], 0.987), "topo": (*chosen[1], 0.91)}

    monkeypatch.setattr(decontam_clip, "clip_matches", clip)
    config = DecontaminationConfig(near_threshold=0.9, near_hash_distance=SUGGESTED)
    found = _image_matches({i: images[i] for i in ids}, bench, config, None, phashes=phashes)
    assert found["hopper/half"].startswith("near copy (phash: ") and \
        found["hopper/half"].endswith("; clip: cosine 0.987 with Bench: hopper.png)")
    assert fired_checks(found["hopper/half"]) == ["phash", "clip"]
    assert found["topo"] == "near copy (clip: cosine 0.910 with Bench: minduka.png)"
    assert fired_checks(found["topo"]) == ["clip"]


def test_the_stage_phash_is_used_and_benchmark_hashes_are_cached_by_identity(planted, tmp_path, monkeypatch):
    import datasets

    bench, images, phashes = planted
    folder = bench[0][1].parent
    ids = ["hopper/jpeg_q60", "bars/crop_2px", "line"]
    table = datasets.Dataset.from_dict({"image_id": ids, "path": [f"x/{i}" for i in ids],
                                        "phash": [f"{phashes[i]:016x}" for i in ids]})
    ctx = SimpleNamespace(cache_dir=tmp_path / "cache", load_stage={"images": table}.__getitem__)
    monkeypatch.setattr("processors.image_locator.image_locator", lambda ctx: images.__getitem__)
    calls = []
    real = decontam.image_hashes
    monkeypatch.setattr(decontam, "image_hashes", lambda path, perceptual=True: calls.append(
        (Path(path).parent.name, perceptual)) or real(path, perceptual))
    config = DecontaminationConfig(benchmark_images=[{"name": "Bench", "folder": str(folder)}], **{
        "near_threshold": None, "near_hash_distance": SUGGESTED})
    rows = {"qa_id": ["q1", "q2", "q3"], "image_id": ids, "question": ["What is shown?"] * 3}
    claimed = decontam.contamination_check(config, ctx)(rows)
    assert set(claimed) == {"q1", "q2"} and {reason for reason, _ in claimed.values()} == {"benchmark_image"}
    assert "phash: " in claimed["q1"][1] and "Bench: hopper.png" in claimed["q1"][1]
    assert ("run", True) not in calls  # our images: decoded for the exact check only, the dHash is the stage's
    assert sum(parent == "bench" for parent, _ in calls) == len(PLANTED)
    cached = list((tmp_path / "cache" / "benchmarks").glob("hashes-*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["hashes"]) == len(PLANTED)

    calls.clear()
    decontam.contamination_check(config, ctx)  # the same benchmark identity: read back, nothing decoded
    assert not calls
    files = sorted(folder.glob("*.png"))
    _write(folder, "new.png", _encode(Image.new("RGB", (40, 30), "red"), "PNG"))
    try:
        assert len(benchmark_hashes(config.benchmark_images[0], sorted(folder.glob("*.png")), ctx.cache_dir)) == \
            len(files) + 1  # a changed folder is another identity: hashed again
        assert len(list((tmp_path / "cache" / "benchmarks").glob("hashes-*.json"))) == 2
    finally:
        (folder / "new.png").unlink()


def test_near_hash_distance_validation():
    assert DecontaminationConfig().near_hash_distance is None  # off unless asked for
    assert DecontaminationConfig(near_hash_distance=0).near_hash_distance == 0
    assert DecontaminationConfig(near_hash_distance=16).near_hash_distance == 16
    for bad in (-1, 17, 2.5, "six"):
        with pytest.raises(ValidationError):
            DecontaminationConfig(near_hash_distance=bad)
    with pytest.raises(ValidationError):
        DecontaminationConfig(near_hash_bits=6)  # extra keys are refused


def test_existing_fingerprints_are_unchanged_and_a_set_distance_enters_them(tmp_path):
    from builder.stage import StageConfig

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    stage, paper = FinalStage(), {"threshold": 2, **StageConfig().model_dump(mode="json")}
    assert stage.fingerprint_config(FinalConfig()) == paper and stage.fingerprint_parts(FinalConfig()) == {}
    benchmarks = [{"name": "B", "folder": str(tmp_path)}]
    enabled = FinalConfig(decontamination={"benchmark_images": benchmarks})
    # what an enabled config's fingerprint held before near_hash_distance existed
    assert stage.fingerprint_config(enabled) == {**paper, "decontamination": {"benchmark_images": [
        {"name": "B", "folder": str(tmp_path)}]}}
    exact_only = FinalConfig(decontamination={"benchmark_images": benchmarks, "near_threshold": None})
    assert stage.fingerprint_config(exact_only)["decontamination"] == {
        "benchmark_images": [{"name": "B", "folder": str(tmp_path)}], "near_threshold": None}
    hashed = FinalConfig(decontamination={"benchmark_images": benchmarks, "near_hash_distance": 6})
    assert stage.fingerprint_config(hashed)["decontamination"]["near_hash_distance"] == 6
    assert stage.fingerprint_parts(hashed) == stage.fingerprint_parts(enabled)  # the same benchmark identity


def test_the_hash_check_alone_needs_no_gpu(tmp_path):
    benchmarks = [{"name": "B", "folder": str(tmp_path)}]
    stage = FinalStage()
    phash_only = FinalConfig(decontamination={"benchmark_images": benchmarks, "near_threshold": None,
                                              "near_hash_distance": 6})
    assert stage.resources(phash_only)["kind"] != "gpu"
    both = FinalConfig(decontamination={"benchmark_images": benchmarks, "near_hash_distance": 6})
    assert stage.resources(both)["kind"] == "gpu"  # the CLIP check (near_threshold 0.95 by default) embeds
