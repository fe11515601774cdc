"""Image work once per image file per process: the cache of what a request needs of an image (content hash,
pixel size), the byte-bounded cache of its wire encoding, and the image locator's once-per-image check."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from builder.ids import bytes_id
from processors.llm import images
from processors.llm.prepare import prepare
from processors.llm.request import LLMRequest
from processors.llm.settings import EndpointSettings


@pytest.fixture(autouse=True)
def _fresh_caches():
    images.clear_caches()
    yield
    images.clear_caches()


def _jpeg(path: Path, size=(320, 200), colour=(10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=90)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def _request(part: dict) -> LLMRequest:
    return LLMRequest(key="k", prompt_version="v1",
                      messages=[{"role": "user", "content": [{"type": "text", "text": "yes?"}, part]}])


def _count_opens(monkeypatch) -> list[str]:
    import loaders.images.paths as paths

    opened, real = [], paths.open_regular_file

    def counting(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(paths, "open_regular_file", counting)
    return opened


def test_an_image_is_read_and_hashed_once_and_gives_what_an_uncached_read_gives(tmp_path, monkeypatch):
    data = _jpeg(tmp_path / "a.jpg")
    opened = _count_opens(monkeypatch)
    part = {"type": "image_path", "path": str(tmp_path / "a.jpg")}
    for _ in range(5):
        assert images.content_ref(part) == {"image_sha": bytes_id(data)}
        assert images.image_size(part) == (320, 200)
    assert len(opened) == 1


def test_cache_keys_and_bodies_are_identical_cold_warm_and_to_the_uncached_bytes_part(tmp_path):
    data = _jpeg(tmp_path / "a.jpg", size=(1500, 900))
    ep = EndpointSettings(model="m", base_url="http://127.0.0.1:9/v1", image_max_side=512)
    by_path = _request({"type": "image_path", "path": str(tmp_path / "a.jpg")})
    by_bytes = _request({"type": "image_bytes", "data": data})
    cold = prepare(by_path, ep)
    cold_body = cold.body_sync()
    warm = prepare(by_path, ep)
    assert warm.cache_key == cold.cache_key and warm.est_tokens == cold.est_tokens
    assert warm.body_sync() == cold_body
    images.clear_caches()
    reference = prepare(by_bytes, ep)  # image_bytes never goes through the file cache
    assert reference.cache_key == cold.cache_key and reference.est_tokens == cold.est_tokens
    url, _ = images._encode(data, 512, ep.image_format)
    assert cold_body["messages"][0]["content"][1]["image_url"]["url"] == url
    assert reference.body_sync() == cold_body


@pytest.mark.parametrize("how", ["rewritten", "replaced", "same_size"])
def test_a_file_changed_on_disk_is_read_again(tmp_path, how):
    path = tmp_path / "a.jpg"
    old = _jpeg(path, colour=(0, 0, 0))
    part = {"type": "image_path", "path": str(path)}
    assert images.content_ref(part) == {"image_sha": bytes_id(old)}
    before = os.stat(path)
    if how == "rewritten":
        new = _jpeg(path, size=(64, 48))
    elif how == "replaced":  # a new inode put in its place
        new = _jpeg(tmp_path / "b.jpg", size=(64, 48))
        os.replace(tmp_path / "b.jpg", path)
    else:  # same size, same inode: only the mtime tells
        new = bytearray(old)
        new[-3] ^= 0xFF
        new = bytes(new)
        with open(path, "r+b") as handle:
            handle.write(new)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert images.content_ref(part) == {"image_sha": bytes_id(new)}
    wire = images.to_wire_part(part, max_side=512, detail="low", fmt="jpeg")
    assert wire["image_url"]["url"] == images._encode(new, 512, "jpeg")[0]


def test_the_caches_stay_within_their_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "FILE_INFO_KEEP", 3)
    paths = [tmp_path / f"{i}.jpg" for i in range(6)]
    for i, path in enumerate(paths):
        _jpeg(path, colour=(i * 40, 0, 0))
    one = len(images.to_wire_part({"type": "image_path", "path": str(paths[0])}, max_side=64, detail="low",
                                   fmt="jpeg")["image_url"]["url"])
    monkeypatch.setattr(images, "ENCODED_MAX_BYTES", 2 * one + one // 2)
    for path in paths:
        images.to_wire_part({"type": "image_path", "path": str(path)}, max_side=64, detail="low", fmt="jpeg")
        assert len(images._FILE_INFO) <= 3
        assert images._encoded_bytes <= images.ENCODED_MAX_BYTES
        assert images._encoded_bytes == sum(map(len, images._ENCODED.values()))
    assert len(images._ENCODED) == 2  # the two most recent
    opened = _count_opens(monkeypatch)
    images.content_ref({"type": "image_path", "path": str(paths[0])})  # evicted: read again
    assert len(opened) == 1


def test_a_fifo_is_still_refused_without_blocking(tmp_path):
    from loaders.images.paths import NotRegularFileError

    os.mkfifo(tmp_path / "fifo")
    part = {"type": "image_path", "path": str(tmp_path / "fifo")}
    with pytest.raises(NotRegularFileError):
        images.content_ref(part)
    assert images.image_size(part) is None
    with pytest.raises(FileNotFoundError):
        images.content_ref({"type": "image_path", "path": str(tmp_path / "missing.jpg")})


# ----------------------------------------------------------------------------------------- image locator
def _locator(tmp_path: Path, rows: dict[str, str]):
    import datasets

    from loaders.images.paths import ROOTS_FILE, write_roots
    from processors.image_locator import image_locator

    run_dir = tmp_path / "run"
    (run_dir / "01_images").mkdir(parents=True)
    root = run_dir / "images"
    root.mkdir()
    write_roots(run_dir / "01_images" / ROOTS_FILE, run_dir, {"store": root})
    table = datasets.Dataset.from_dict({"image_id": list(rows), "path": list(rows.values())})
    ctx = SimpleNamespace(run_dir=run_dir, load_stage=lambda name: table)
    return image_locator(ctx), root


def test_the_locator_resolves_an_image_once_and_still_sees_it_go_or_turn_into_an_escaping_link(tmp_path,
                                                                                               monkeypatch):
    from processors.image_locator import ImageUnavailable

    locate, root = _locator(tmp_path, {"a": "store/a.jpg", "b": "store/b.jpg", "up": "store/../x.jpg"})
    _jpeg(root / "a.jpg")
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: calls.append(p) or real(p, **kw))
    assert locate("a") == root / "a.jpg"
    first = len(calls)
    for _ in range(5):
        assert locate("a") == root / "a.jpg"
    assert len(calls) == first  # no realpath after the first row of an image
    with pytest.raises(ImageUnavailable, match="not in the images stage"):
        locate("nope")
    with pytest.raises(ImageUnavailable):
        locate("up")
    with pytest.raises(ImageUnavailable, match="gone"):
        locate("b")
    (root / "a.jpg").unlink()
    with pytest.raises(ImageUnavailable, match="gone"):
        locate("a")
    outside = tmp_path / "secret.jpg"
    _jpeg(outside)
    (root / "a.jpg").symlink_to(outside)
    with pytest.raises(ImageUnavailable, match="outside its root"):
        locate("a")
    (root / "a.jpg").unlink()
    os.mkfifo(root / "a.jpg")
    with pytest.raises(ImageUnavailable, match="gone"):
        locate("a")


def test_a_symlink_inside_its_root_is_checked_on_every_row(tmp_path):
    from processors.image_locator import ImageUnavailable

    locate, root = _locator(tmp_path, {"a": "store/a.jpg"})
    _jpeg(root / "target.jpg")
    (root / "a.jpg").symlink_to(root / "target.jpg")
    assert locate("a") == root / "a.jpg"
    (root / "a.jpg").unlink()
    _jpeg(tmp_path / "secret.jpg")
    (root / "a.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(ImageUnavailable, match="outside its root"):
        locate("a")
