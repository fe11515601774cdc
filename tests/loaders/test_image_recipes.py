"""Named recipes against a local server: download, resume, checksum, unpack, manual sets, hostile archives."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from loaders.images.archives import ArchiveError, download_file, unpack
from loaders.images.download import DownloadConfig
from loaders.images.prepare import prepare_recipe
from loaders.images.recipes import RECIPES
from loaders.images.sources import RecipeSource
from local_http import LocalServer

CONFIG = DownloadConfig(allowed_networks=("127.0.0.1/32",), retries=0, backoff_s=0.01)


def jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), (i, 0, 0)).save(out, "JPEG")
    return out.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture()
def served(tmp_path):
    files = tmp_path / "served"
    files.mkdir()
    make_zip(files / "train_val_images.zip", {f"train_images/{i}.jpg": jpeg(i) for i in range(5)})
    make_zip(files / "train2017.zip", {"train2017/1.jpg": jpeg(1)})
    with LocalServer(files=files) as server:
        yield server


def test_recipe_downloads_unpacks_once_and_lists(served, tmp_path):
    source = RecipeSource(type="recipe", recipe="textvqa", root=tmp_path / "tv", mirror=served.url("files"))
    dirs = prepare_recipe(source, tmp_path, CONFIG)
    assert dirs == [tmp_path / "tv" / "train_images"]
    assert sorted(p.name for p in dirs[0].iterdir()) == [f"{i}.jpg" for i in range(5)]
    prepare_recipe(source, tmp_path, CONFIG)  # second call: marker present, nothing fetched
    assert served.hits["files/train_val_images.zip"] == 1


def test_published_checksum_is_enforced(served, tmp_path):
    source = RecipeSource(type="recipe", recipe="coco_train2017", root=tmp_path / "coco", mirror=served.url("files"))
    with pytest.raises(ArchiveError, match="md5 mismatch"):
        prepare_recipe(source, tmp_path, CONFIG)
    assert not list((tmp_path / "coco" / ".downloads").glob("*.part"))


def test_download_resumes_from_a_partial_file(served, tmp_path):
    whole = (Path(served.files) / "train_val_images.zip").read_bytes()
    dest = tmp_path / "dl" / "train_val_images.zip"
    dest.parent.mkdir()
    dest.with_name(dest.name + ".part").write_bytes(whole[:100])
    download_file(served.url("files/train_val_images.zip"), dest, CONFIG)
    assert dest.read_bytes() == whole and served.ranges == ["bytes=100-"]


def test_loopback_mirror_refused_without_permission(served, tmp_path):
    source = RecipeSource(type="recipe", recipe="textvqa", root=tmp_path / "tv", mirror=served.url("files"))
    with pytest.raises(ArchiveError, match="non-public"):
        prepare_recipe(source, tmp_path, DownloadConfig(retries=0))


def test_manual_recipes_explain_the_step_and_accept_files_in_place(tmp_path):
    source = RecipeSource(type="recipe", recipe="sam", root=tmp_path / "sam")
    with pytest.raises(ArchiveError, match="licence"):
        prepare_recipe(source, tmp_path, CONFIG)
    (tmp_path / "sam" / "images").mkdir(parents=True)
    assert prepare_recipe(source, tmp_path, CONFIG) == [tmp_path / "sam" / "images"]
    assert all(r.manual or r.archives for r in RECIPES.values())


def test_download_off_gives_the_url(tmp_path):
    source = RecipeSource(type="recipe", recipe="vg_100k", root=tmp_path / "vg", download=False)
    with pytest.raises(ArchiveError, match="cs.stanford.edu"):
        prepare_recipe(source, tmp_path, CONFIG)


def test_archives_that_escape_are_refused(tmp_path):
    with pytest.raises(ArchiveError, match="outside"):
        unpack(make_zip(tmp_path / "evil.zip", {"../../evil.jpg": b"x"}), tmp_path / "out")
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(ArchiveError, match="link"):
        unpack(tar_path, tmp_path / "out")
    assert not (tmp_path / "evil.jpg").exists()
