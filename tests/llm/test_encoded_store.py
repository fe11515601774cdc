"""The disk tier of images' wire encodings (``llm.image_store_gb``): a later stage reads an encoding instead of
making it again, gets the very bytes the encoder wrote, and the store never fails a request - full, over its
limit, or on a disk that refuses writes."""

from __future__ import annotations

import contextlib
import io
import logging
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from processors.llm import images
from processors.llm.encoded_store import ENCODED_STORE_FOLDER, EncodedStore, pillow_version
from processors.llm.prepare import prepare
from processors.llm.request import LLMRequest
from processors.llm.settings import EndpointSettings, LLMSettings


@pytest.fixture(autouse=True)
def _fresh_caches():
    images.clear_caches()
    yield
    images.clear_caches()


def _image(path: Path, size=(1500, 900), fmt="JPEG", colour=(10, 120, 200)) -> Path:
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 37):  # some detail, so the encoding is not trivially small
        image.putpixel((x, x % size[1]), (x % 255, 30, 200))
    out = io.BytesIO()
    image.save(out, fmt)
    path.write_bytes(out.getvalue())
    return path


def _endpoint(fmt="jpeg", side=512) -> EndpointSettings:
    return EndpointSettings(model="m", base_url="http://127.0.0.1:9/v1", image_max_side=side, image_format=fmt)


def _wire_url(path: Path, ep: EndpointSettings) -> str:
    request = LLMRequest(key="k", prompt_version="v1", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_path", "path": str(path)}]}])
    return prepare(request, ep).body_sync()["messages"][0]["content"][1]["image_url"]["url"]


def _count_encodings(monkeypatch) -> list[int]:
    calls, real = [], images._encode_image

    def counting(data, max_side, fmt):
        calls.append(max_side)
        return real(data, max_side, fmt)

    monkeypatch.setattr(images, "_encode_image", counting)
    return calls


def _stored(folder: Path) -> int:
    path = folder / f"pillow-{pillow_version()}.sqlite"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT count(*) FROM encodings").fetchone()[0]


def _forget_memory(store_folder: Path, gb: float = 1.0) -> None:
    """What a later stage in a fresh process sees: no encoding in memory, the disk tier switched on."""
    images.clear_caches()
    images.use_encoded_store(store_folder, gb)


@pytest.mark.parametrize("fmt,file_fmt", [("jpeg", "JPEG"), ("png", "PNG")])
def test_a_later_stage_reads_the_stored_encoding_byte_for_byte_instead_of_encoding_again(
        tmp_path, monkeypatch, fmt, file_fmt):
    picture = _image(tmp_path / f"a.{fmt}", fmt=file_fmt)
    ep = _endpoint(fmt)
    reference = _wire_url(picture, ep)  # no store: what the request has always carried
    calls = _count_encodings(monkeypatch)

    _forget_memory(tmp_path / "cache" / ENCODED_STORE_FOLDER)
    assert _wire_url(picture, ep) == reference and len(calls) == 1  # encoded, and stored
    assert _stored(tmp_path / "cache" / ENCODED_STORE_FOLDER) == 1

    _forget_memory(tmp_path / "cache" / ENCODED_STORE_FOLDER)
    assert _wire_url(picture, ep) == reference and len(calls) == 1  # read back, not encoded
    assert images.encoded_store().hits == 1


def test_off_by_default_and_without_a_folder(tmp_path):
    assert LLMSettings().image_store_gb == 0
    images.use_encoded_store(tmp_path / "s", 0)
    assert images.encoded_store() is None
    _wire_url(_image(tmp_path / "a.jpg"), _endpoint())
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("typo", [float("inf"), float("nan"), True, "yes", "4", -1])
def test_a_limit_that_is_no_finite_number_of_gb_is_a_config_error(typo):
    """``.inf`` once passed and crashed the first stage (int(inf)); YAML's ``yes`` was read as 1 GB."""
    with pytest.raises(ValueError, match="image_store_gb"):
        LLMSettings(image_store_gb=typo)
    assert LLMSettings(image_store_gb=4).image_store_gb == 4.0  # a YAML integer is a number of GB


def test_a_store_at_its_limit_keeps_what_it_has_and_stores_no_more(tmp_path, monkeypatch, caplog):
    ep = _endpoint()
    first, second = _image(tmp_path / "a.jpg"), _image(tmp_path / "b.jpg", colour=(200, 10, 10))
    folder = tmp_path / ENCODED_STORE_FOLDER
    _forget_memory(folder)
    _wire_url(first, ep)
    with contextlib.closing(sqlite3.connect(images.encoded_store().path)) as db:
        size = db.execute("SELECT total(length(data)) FROM encodings").fetchone()[0]
    limit_gb = (size + 10) / 1024**3  # room for the first encoding, not for a second one
    calls = _count_encodings(monkeypatch)
    with caplog.at_level(logging.INFO, logger="processors.llm.encoded_store"):
        _forget_memory(folder, limit_gb)
        reference = _wire_url(second, ep)
        _forget_memory(folder, limit_gb)
        assert _wire_url(second, ep) == reference and _wire_url(first, ep)
    assert len(calls) == 2  # the second image was encoded twice: the full store did not take it
    assert _stored(folder) == 1
    assert any("full" in record.getMessage() for record in caplog.records)


def test_a_store_that_cannot_be_opened_switches_off_with_one_warning_and_no_failed_request(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder would go")
    ep = _endpoint()
    pictures = [_image(tmp_path / f"{i}.jpg", colour=(i * 40, 10, 10)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="processors.llm.encoded_store"):
        images.use_encoded_store(blocker / "store", 1.0)
        urls = [_wire_url(p, ep) for p in pictures]
    assert all(url.startswith("data:image/jpeg;base64,") for url in urls)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "goes on without it" in warnings[0]
    assert f"{blocker} is a file, not a folder" in warnings[0]  # the advice names what is in the way


def test_a_damaged_store_file_is_a_miss_with_one_warning_not_a_failed_request(tmp_path, caplog):
    folder = tmp_path / ENCODED_STORE_FOLDER
    folder.mkdir()
    (folder / f"pillow-{pillow_version()}.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    picture, ep = _image(tmp_path / "a.jpg"), _endpoint()
    reference = _wire_url(picture, ep)
    with caplog.at_level(logging.WARNING, logger="processors.llm.encoded_store"):
        _forget_memory(folder)
        assert _wire_url(picture, ep) == reference
        _forget_memory(folder)
        assert _wire_url(picture, ep) == reference
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 2  # once per process (here: per store)
    assert all("The file is damaged: delete" in r.getMessage() for r in caplog.records)


def test_a_folder_that_cannot_even_be_searched_still_fails_no_request(tmp_path, monkeypatch, caplog):
    """Path.exists() raises PermissionError under a folder the process cannot search (Python 3.11): the
    advice in the warning must not turn the store's failure into a failed request."""
    real_exists = Path.exists

    def exists(path, *args, **kwargs):
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    store = EncodedStore(tmp_path / "locked" / "store", 1024**3)
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with caplog.at_level(logging.WARNING, logger="processors.llm.encoded_store"):
        assert store.get(("ab" * 16, 512, "jpeg")) is None
        store.put(("ab" * 16, 512, "jpeg"), b"data")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Check that this process can write" in warnings[0]


def test_status_shows_the_stores_size_and_nothing_without_one(tmp_path):
    from processors.llm.encoded_store import status_line

    assert status_line(tmp_path / "cache") is None
    store = EncodedStore(tmp_path / "cache" / ENCODED_STORE_FOLDER, 1024**3)
    store.put(("ab" * 16, 512, "jpeg"), b"x" * 3_000_000)
    store.close()
    line = status_line(tmp_path / "cache")
    assert line is not None and line.startswith("image store: 3 MB of image encodings in ")


def test_a_key_that_is_not_a_digest_is_never_stored_or_read(tmp_path):
    store = EncodedStore(tmp_path, 1024**3)
    store.put(("../x", 512, "jpeg"), b"data")
    store.put(("ab" * 16, 512, "gif"), b"data")
    assert store.get(("../x", 512, "jpeg")) is None and store.writes == 0
    store.put(("ab" * 16, 512, "jpeg"), b"data")
    assert store.get(("ab" * 16, 512, "jpeg")) == b"data"


def test_the_run_config_switches_it_on_for_a_stages_client(tmp_path):
    from types import SimpleNamespace

    from processors.llm.client import LLMClient

    ctx = SimpleNamespace(settings=SimpleNamespace(llm=LLMSettings(image_store_gb=2.5)), cache_dir=tmp_path / "cache",
                          stage_dir=tmp_path / "stages" / "qa", dry_run=True, services={},
                          current_meter=lambda: None, stop_event=lambda: None)
    LLMClient.for_stage(ctx)
    store = images.encoded_store()
    assert store is not None and store.max_bytes == int(2.5 * 1024**3)
    assert store.path == tmp_path / "cache" / ENCODED_STORE_FOLDER / f"pillow-{pillow_version()}.sqlite"


def test_the_store_leaves_the_disk_its_reserve(tmp_path, monkeypatch, caplog):
    from processors.llm import encoded_store

    monkeypatch.setattr(encoded_store, "FREE_RESERVE", 10**18)  # more than any disk has free
    with caplog.at_level(logging.INFO, logger="processors.llm.encoded_store"):
        _forget_memory(tmp_path / "store")
        assert _wire_url(_image(tmp_path / "a.jpg"), _endpoint()).startswith("data:image/jpeg")
    assert _stored(tmp_path / "store") == 0
    assert any("left on its disk" in r.getMessage() for r in caplog.records)


CHILD = """
import sys, time
from pathlib import Path
from processors.llm.encoded_store import EncodedStore
folder, go, index = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
store = EncodedStore(folder, 1024**3)
while not go.exists():  # all start together: the first opens race for the switch to WAL
    time.sleep(0.001)
store.put((f"{index:02d}" * 16, 512, "jpeg"), b"encoded-%d" % index)
print("broken" if store._broken else "ok", store.writes)
"""


def test_processes_opening_one_store_at_once_do_not_switch_it_off(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    go = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "store"), str(go), str(i)],
                                 cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(6)]
    go.touch()
    outputs = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), [err for _, err in outputs]
    assert [out.split()[0] for out, _ in outputs] == ["ok"] * 6, outputs
    stored = _stored(tmp_path / "store")
    assert stored == sum(int(out.split()[1]) for out, _ in outputs) and stored >= 1


def test_processes_sharing_a_store_keep_to_its_limit_within_a_batch_of_writes(tmp_path, monkeypatch):
    from processors.llm import encoded_store

    monkeypatch.setattr(encoded_store, "DISK_CHECK_EVERY", 1)  # look at the file's size at every write
    first, second = EncodedStore(tmp_path, 40_000), EncodedStore(tmp_path, 40_000)  # two processes' stores
    for i in range(10):
        first.put((f"a{i:031d}", 512, "jpeg"), bytes(1000))
        second.put((f"b{i:031d}", 512, "jpeg"), bytes(1000))
    assert first._file_bytes() <= 40_000 + 2 * 8192  # the limit, give or take a page each
    assert first._full or second._full


def test_a_closed_store_stays_closed(tmp_path):
    store = EncodedStore(tmp_path, 1024**3)
    store.put(("ab" * 16, 512, "jpeg"), b"data")
    store.close()
    assert store.get(("ab" * 16, 512, "jpeg")) is None and store._db is None


@pytest.mark.parametrize("name", ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"])
def test_real_photos_read_back_from_the_store_are_the_bytes_a_fresh_encoding_sends(tmp_path, name):
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / name  # real pictures shipped in the wheel
    for ep in (_endpoint("jpeg", 512), _endpoint("jpeg", 1344), _endpoint("png", 768)):
        images.clear_caches()
        reference = _wire_url(photo, ep)
        _forget_memory(tmp_path / "store")
        assert _wire_url(photo, ep) == reference  # encoded and stored
        _forget_memory(tmp_path / "store")
        assert _wire_url(photo, ep) == reference and images.encoded_store().hits == 1  # read back
