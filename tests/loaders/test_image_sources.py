"""Folder listing, path safety, URL lists, synthetic images, Hub/local datasets, and source config errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image

from builder.config import ConfigError, build_config_model, validate_config
from loaders.images.folder import list_images
from loaders.images.hub import cell_bytes, open_hub_dataset
from loaders.images.listing import read_url_list
from loaders.images.paths import PathEscapeError, resolve_image_path, safe_join
from loaders.images.sources import HubSource
from loaders.images.synthetic import KINDS, synthetic_image
from processors.stages.images import ImagesStage


def png(color=(1, 2, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("bad", ["../x.jpg", "/etc/passwd", "a/../../x", "a/../b", "", ".", "./", "..",
                                 "..\\\\win.jpg", "a\\\\..\\\\..\\\\x"])
def test_safe_join_refuses_escapes(tmp_path, bad):
    with pytest.raises(PathEscapeError):
        safe_join(tmp_path, bad)


@pytest.mark.parametrize(("plain", "parts"), [("./a/x.jpg", ("a", "x.jpg")), ("a//x.jpg", ("a", "x.jpg")),
                                              ("a/./x.jpg", ("a", "x.jpg")), ("a/", ("a",)), ("C:/x", ("C:", "x"))])
def test_safe_join_accepts_plain_paths_written_loosely(tmp_path, plain, parts):
    # e.g. members of `tar czf x.tgz ./images`, or a Hub cell holding "./img.jpg"
    assert safe_join(tmp_path, plain) == tmp_path.joinpath(*parts)


def test_a_relative_root_is_resolved_against_the_current_folder_each_time(tmp_path, monkeypatch):
    # the root's realpath is cached: by absolute path, so a changed working folder cannot reuse a stale one
    for name in ("one", "two"):
        (tmp_path / name / "root").mkdir(parents=True)
    (tmp_path / "two" / "outside.jpg").write_bytes(png())
    os.symlink(tmp_path / "two" / "outside.jpg", tmp_path / "two" / "root" / "y.jpg")
    monkeypatch.chdir(tmp_path / "one")
    assert safe_join(Path("root"), "x.jpg") == Path("root") / "x.jpg"
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(PathEscapeError):
        safe_join(Path("root"), "y.jpg")


def test_folder_listing_is_sorted_and_links_cannot_escape(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "b.PNG").write_bytes(png())
    (root / "sub" / "a.jpg").write_bytes(png())
    (root / "notes.txt").write_text("x")
    (tmp_path / "secret.jpg").write_bytes(png())
    os.symlink(tmp_path / "secret.jpg", root / "leak.jpg")
    os.symlink(tmp_path, root / "loop")  # a folder link: never descended into
    assert list_images(root, (".jpg", ".png")) == ["b.PNG", "leak.jpg", "sub/a.jpg"]
    with pytest.raises(PathEscapeError):
        safe_join(root, "leak.jpg")
    assert safe_join(root, "sub/a.jpg") == root / "sub" / "a.jpg"
    with pytest.raises(PathEscapeError):
        resolve_image_path(tmp_path, "nowhere/a.jpg", roots={"root": root})


def test_url_lists_in_every_format(tmp_path):
    (tmp_path / "u.txt").write_text("\ufeff# comment\nhttp://a/1.jpg\n\n  http://a/2.jpg  \n")
    (tmp_path / "u.csv").write_text("id,url\n1,http://a/1.jpg\n2,http://a/2.jpg\n")
    (tmp_path / "u.jsonl").write_text('{"link": "http://a/1.jpg"}\n{"link": "http://a/2.jpg"}\n')
    datasets.Dataset.from_dict({"url": ["http://a/1.jpg", "http://a/2.jpg"]}).to_parquet(str(tmp_path / "u.parquet"))
    want = ["http://a/1.jpg", "http://a/2.jpg"]
    assert read_url_list(tmp_path / "u.txt") == want
    assert read_url_list(tmp_path / "u.csv") == want
    assert read_url_list(tmp_path / "u.jsonl", "link") == want
    assert read_url_list(tmp_path / "u.parquet") == want
    with pytest.raises(ValueError, match="no column 'url'"):
        read_url_list(tmp_path / "u.jsonl")


def test_synthetic_images_are_deterministic_and_cover_every_kind():
    first = [synthetic_image(0, i, (128, 96)) for i in range(len(KINDS))]
    assert first == [synthetic_image(0, i, (128, 96)) for i in range(len(KINDS))]
    assert len(set(first)) == len(KINDS)
    assert synthetic_image(1, 0, (128, 96)) != first[0]
    formats = {Image.open(io.BytesIO(b)).format for b in first}
    assert formats == {"PNG", "JPEG"}


def test_local_dataset_folder_with_image_column(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png((9, 9, 9)), "path": None}], "n": [1]},
                                    features=datasets.Features({"image": datasets.Image(), "n": datasets.Value("int32")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    source = HubSource(type="hub", path=tmp_path / "saved")
    opened = open_hub_dataset(source)
    assert opened.column_names == ["image"] and cell_bytes(opened[0]["image"], source) == png((9, 9, 9))


def test_config_errors_name_the_key(tmp_path):
    model = build_config_model([ImagesStage()])
    base = {"run": {"name": "t"}}
    cases = {
        "sources": {"images": {"sources": []}},
        "unknown recipe": {"images": {"sources": [{"type": "recipe", "recipe": "laion5b"}]}},
        "must be unique": {"images": {"sources": [{"type": "synthetic"}, {"type": "synthetic"}]}},
        "reserved": {"images": {"sources": [{"type": "synthetic", "name": "store"}]}},
        "no such file": {"images": {"sources": [{"type": "folder", "root": "missing"}]}},
        "exactly one": {"images": {"sources": [{"type": "hub"}]}},
        "colour": {"images": {"sources": [{"type": "synthetic", "colour": 1}]}},
    }
    for expected, stages in cases.items():
        with pytest.raises(ConfigError, match=expected):
            validate_config({**base, "stages": stages}, model, base_dir=tmp_path)
