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


# ------------------------------------------------------------------------ encodings shared and spliced
def _count_encodes(monkeypatch) -> list[tuple[int, str]]:
    calls, real = [], images._encode_image

    def counting(data, max_side, fmt):
        calls.append((max_side, fmt))
        return real(data, max_side, fmt)

    monkeypatch.setattr(images, "_encode_image", counting)
    return calls


def test_an_image_that_fits_is_encoded_once_for_every_longest_side(tmp_path, monkeypatch):
    data = _jpeg(tmp_path / "a.jpg", size=(320, 200))
    big = _jpeg(tmp_path / "b.jpg", size=(1500, 900))
    calls = _count_encodes(monkeypatch)
    sent = {}
    for side in (512, 1120, 1344, 320):  # 320: its longest side itself still fits
        sent[side] = images.to_wire_part({"type": "image_path", "path": str(tmp_path / "a.jpg")}, max_side=side,
                                         detail="low", fmt="jpeg")["image_url"]["url"]
    assert len(calls) == 1
    for side in (512, 1120):  # an image larger than the side: one encoding per side, as before
        images.to_wire_part({"type": "image_path", "path": str(tmp_path / "b.jpg")}, max_side=side, detail="low",
                            fmt="jpeg")
    assert len(calls) == 3
    monkeypatch.undo()
    for side, url in sent.items():  # what each side's own encoding gives
        assert url == images._encode(data, side, "jpeg")[0]
    assert images._encode(big, 512, "jpeg") != images._encode(big, 1120, "jpeg")


def test_threads_that_want_one_image_at_once_encode_it_once(tmp_path, monkeypatch):
    import threading
    import time

    data = _jpeg(tmp_path / "a.jpg")
    calls, real = [], images._encode_image

    def slow(data, max_side, fmt):
        calls.append(max_side)
        time.sleep(0.05)  # long enough for the others to find it being encoded
        return real(data, max_side, fmt)

    monkeypatch.setattr(images, "_encode_image", slow)
    part = {"type": "image_path", "path": str(tmp_path / "a.jpg")}
    urls = []
    threads = [threading.Thread(target=lambda: urls.append(images.to_wire_part(
        part, max_side=512, detail="low", fmt="jpeg")["image_url"]["url"])) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(urls) == 6 and len(set(urls)) == 1
    assert urls[0] == images.data_url(real(data, 512, "jpeg")[0], "jpeg") and not images._ENCODING


def test_bodies_built_on_the_loop_are_the_thread_built_ones_and_encode_an_image_once(tmp_path, monkeypatch):
    import asyncio

    _jpeg(tmp_path / "a.jpg", size=(640, 480))
    calls = _count_encodes(monkeypatch)
    ep = EndpointSettings(model="m", base_url="http://127.0.0.1:9/v1", image_max_side=512)
    prepared = [prepare(_request({"type": "image_path", "path": str(tmp_path / "a.jpg")}), ep) for _ in range(8)]

    async def all_bodies():
        return await asyncio.gather(*(p.body() for p in prepared))

    bodies = asyncio.run(all_bodies())
    assert len(calls) == 1
    images.clear_caches()
    assert all(body == prepared[0].body_sync() for body in bodies)  # read, hashed and encoded again: the same


def test_a_body_with_data_urls_is_the_same_json_text_spliced_or_not():
    import json

    from processors.llm.transport import _URL_MARK, body_json

    url = images.DataURL("data:image/jpeg;base64," + "QUJD+/9=" * 5000)
    body = {"model": "m", "messages": [
        {"role": "system", "content": "é \" \\ \n"},
        {"role": "user", "content": [{"type": "text", "text": "yes?"},
                                     {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                                     {"type": "image_url", "image_url": {"detail": "high", "url": url}},
                                     {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}],
        "max_tokens": 1, "logprobs": True, "structured_outputs": {"choice": ["0", "1"]}}
    assert body_json(body) == json.dumps(body)
    marked = {**body, "messages": [*body["messages"], {"role": "user", "content": json.loads(_URL_MARK)}]}
    assert body_json(marked) == json.dumps(marked)  # the mark in a request's own text: encoded whole
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert body_json(plain) == json.dumps(plain)


def _encode_with_copies(data: bytes, max_side: int, fmt: str) -> str:
    """``images._encode`` as it was before it worked in place (the reference its bytes must equal)."""
    import base64

    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        opened.draft("RGB", (max_side, max_side))
        image = ImageOps.exif_transpose(opened)
        image.thumbnail((max_side, max_side))
        if fmt == "jpeg":
            image = image.convert("RGB")
            mime, save_as, options = "image/jpeg", "JPEG", {"quality": 90}
        else:
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA")
            mime, save_as, options = "image/png", "PNG", {}
        out = io.BytesIO()
        image.save(out, save_as, **options)
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode('ascii')}"


@pytest.mark.parametrize("mode,source", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                         ("P", "PNG"), ("LA", "PNG"), ("RGB", "WEBP")])
def test_encoding_in_place_writes_the_bytes_the_copies_wrote(mode, source):
    for size, orientation in (((600, 400), 1), ((600, 400), 6), ((1500, 900), 3), ((300, 1400), 8)):
        image = Image.radial_gradient("L").resize(size).convert(mode)
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = io.BytesIO()
        image.save(out, source, exif=exif.tobytes())
        for side in (512, 1344):
            for fmt in ("jpeg", "png"):
                assert images._encode(out.getvalue(), side, fmt)[0] == _encode_with_copies(out.getvalue(), side, fmt)
