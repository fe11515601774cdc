"""Image sources read regular files only: FIFOs, sockets, devices, folders and symlinks to them are refused with
a reason before they are opened, no read waits without a bound, and folder listings count what they pass over.

Every read of a hostile path runs in a daemon thread joined with a deadline: on code that would block in
``open()`` the test fails at the deadline instead of hanging the test run (the thread is then released by
opening the FIFO's other end).
"""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from builder.config import ConfigError, build_config_model, validate_config
from loaders.images import paths
from loaders.images.archives import ArchiveError, unpack
from loaders.images.download import DownloadConfig
from loaders.images.fetch import Fetcher
from loaders.images.hub import HubCellError, cell_bytes
from loaders.images.sources import HubSource
from processors.stages.images import ImagesStage

DEADLINE_S = 5.0


def png(color=(1, 2, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(out, "PNG")
    return out.getvalue()


def within_deadline(call, *, release: Path | None = None):
    """``call()`` in a daemon thread; its result, or a test failure if it has not returned by the deadline."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        if release is not None:  # a reader blocked on the FIFO returns once a writer opens it
            os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still blocked after {DEADLINE_S} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture()
def hostile_root(tmp_path):
    """A folder root holding a good image and, under image names, a FIFO, a socket, a folder and links."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "good.png").write_bytes(png())
    os.mkfifo(root / "pipe.jpg")
    os.symlink(root / "pipe.jpg", root / "link-to-pipe.jpg")
    (root / "folder.jpg").mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.png"))
    (tmp_path / "outside.png").write_bytes(png((9, 9, 9)))
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    yield root
    listener.close()


@pytest.mark.parametrize(("name", "reason", "words"), [
    ("pipe.jpg", "image_not_regular_file", "a named pipe (FIFO)"),
    ("link-to-pipe.jpg", "image_not_regular_file", "a symlink to a named pipe (FIFO)"),
    ("sock.png", "image_not_regular_file", "a socket"),
    ("folder.jpg", "image_not_regular_file", "a folder"),
    ("escape.png", "path_escape", "outside its root"),
    ("gone.png", "image_missing", "no longer exists"),
])
def test_folder_rows_refuse_non_regular_files_before_opening(hostile_root, name, reason, words):
    fetcher = Fetcher({}, {"root": hostile_root}, DownloadConfig(), max_bytes=1 << 20)
    row = {"ref": f"root/{name}", "source": "root", "kind": "folder", "locator": name}
    blob = within_deadline(lambda: fetcher.read(row, {}), release=hostile_root / "pipe.jpg")
    assert (blob.data, blob.reason) == (None, reason)
    assert words in blob.detail and name in blob.detail
    assert fetcher.read({**row, "ref": "root/good.png", "locator": "good.png"}, {}).data == png()


def test_a_device_is_refused_and_never_read(tmp_path):
    blob = within_deadline(lambda: Fetcher({}, {}, DownloadConfig(), 1 << 20)._read_file(Path("/dev/zero")))
    assert blob.reason == "image_not_regular_file" and "a character device" in blob.detail


def test_a_fifo_swapped_in_after_the_check_is_caught_on_the_open_fd(tmp_path, monkeypatch):
    # the race: the path was a regular file when stat'ed and is a FIFO when opened. O_NONBLOCK returns at once
    # (no writer needed) and fstat on the fd refuses it.
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    monkeypatch.setattr(paths, "require_regular_file", lambda path: None)  # the stat saw a regular file
    with pytest.raises(paths.NotRegularFileError, match="became a named pipe"):
        within_deadline(lambda: paths.read_regular_file(fifo, 100), release=fifo)


def test_reads_are_bounded_by_max_bytes(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 5000)
    blob = Fetcher({}, {}, DownloadConfig(), max_bytes=1000)._read_file(big)
    assert blob.reason == "image_too_large" and "limits.max_bytes" in blob.detail
    assert paths.read_regular_file(big, 5004) == big.read_bytes()


def test_open_rgb_refuses_a_fifo_at_once(tmp_path):
    from processors.imageio import NotRegularFileError, open_rgb

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(NotRegularFileError):  # an OSError: stages record it as a broken image
        within_deadline(lambda: open_rgb(tmp_path / "pipe.png"), release=tmp_path / "pipe.png")
    (tmp_path / "ok.png").write_bytes(png())
    assert open_rgb(str(tmp_path / "ok.png")).size == (16, 16)


def test_a_dataset_cell_naming_a_fifo_fails_with_its_reason(tmp_path):
    (tmp_path / "set").mkdir()
    os.mkfifo(tmp_path / "set" / "pipe.png")
    source = HubSource(type="hub", path=tmp_path / "set")
    with pytest.raises(HubCellError) as caught:
        within_deadline(lambda: cell_bytes({"bytes": None, "path": "pipe.png"}, source, 1 << 20),
                        release=tmp_path / "set" / "pipe.png")
    assert caught.value.reason == "image_not_regular_file"
    (tmp_path / "set" / "big.png").write_bytes(b"x" * 2000)
    with pytest.raises(HubCellError) as caught:
        cell_bytes({"bytes": None, "path": "big.png"}, source, 1000)
    assert caught.value.reason == "image_too_large"


def test_a_fifo_url_list_or_a_file_as_folder_root_is_a_config_error(tmp_path):
    os.mkfifo(tmp_path / "urls.txt")
    (tmp_path / "photo.png").write_bytes(png())
    model = build_config_model([ImagesStage()])
    cases = {"named pipe": {"type": "urls", "file": "urls.txt"},
             "not a folder": {"type": "folder", "root": "photo.png"}}
    for expected, source in cases.items():
        with pytest.raises(ConfigError, match=expected):
            within_deadline(lambda: validate_config({"run": {"name": "t"}, "stages": {"images": {"sources": [source]}}},
                                                    model, base_dir=tmp_path), release=tmp_path / "urls.txt")


def test_a_fifo_in_place_of_an_archive_is_refused(tmp_path):
    os.mkfifo(tmp_path / "images.zip")
    with pytest.raises(ArchiveError, match="named pipe"):
        within_deadline(lambda: unpack(tmp_path / "images.zip", tmp_path / "out"), release=tmp_path / "images.zip")


def test_folder_listing_counts_what_it_passes_over(tmp_path):
    from loaders.images.folder import scan_images

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(png())
    for name in ("a.png", "sub/b.jpg", ".hidden.png", "._a.png", ".DS_Store", "notes.txt"):
        (root / name).write_bytes(png())
    os.symlink(tmp_path, root / "linked")
    os.mkfifo(root / "pipe.jpg")  # listed: it fails when read, with its reason
    found = scan_images(root, (".jpg", ".png"))
    assert found.files == ["a.png", "pipe.jpg", "sub/b.jpg"]
    assert dict(found.skipped) == {"hidden_file": 3, "hidden_folder": 1, "linked_folder": 1, "other_extension": 1}
