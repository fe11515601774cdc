"""Export and push never delete files they did not make."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from builder import runfolder as rf
from processors.publish.export import _place_image
from processors.publish.hub import MARKER, _refuse_foreign_folder, _swap_into_place


def test_an_image_root_that_holds_the_source_itself_is_left_alone(tmp_path):
    source = tmp_path / "imgs" / "a.jpg"
    source.parent.mkdir()
    source.write_bytes(b"jpeg bytes")
    for copy in (False, True):
        _place_image(source, source, copy=copy)  # --image-root overlapping a folder source
        assert source.read_bytes() == b"jpeg bytes" and not source.is_symlink()


def test_a_foreign_file_at_the_target_is_refused_and_our_link_is_replaced(tmp_path):
    source, other = tmp_path / "a.jpg", tmp_path / "b.jpg"
    source.write_bytes(b"a")
    other.write_bytes(b"b")
    target = tmp_path / "out" / "a.jpg"
    target.parent.mkdir()
    target.write_bytes(b"somebody else's file")
    with pytest.raises(FileExistsError, match="choose an empty --image-root"):
        _place_image(source, target, copy=False)
    assert target.read_bytes() == b"somebody else's file"
    target.unlink()
    target.symlink_to(other)  # a link from an earlier export is ours to replace
    _place_image(source, target, copy=False)
    assert target.resolve() == source.resolve()


def test_push_refuses_to_replace_a_folder_it_did_not_lay_out(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        _refuse_foreign_folder(precious)
    assert (precious / "keep.txt").read_text() == "mine"
    ours, staging = tmp_path / "hub", tmp_path / "staging"
    for folder, name in ((ours, "old.parquet"), (staging, "new.parquet")):
        folder.mkdir()
        (folder / MARKER).write_text("laid out by taskgalaxy push")
        (folder / name).write_text("x")
    _refuse_foreign_folder(ours)  # a folder we laid out before is ours to replace
    _swap_into_place(staging, ours)
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "new.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hub"]  # nothing left beside it


# -- --image-root: where an export may put its image folder (issue 20, item 10e) --------------------------------
def _export(run_dir, out, *extra) -> int:
    from taskgalaxy import main

    return main(["export", str(run_dir), "--llava", str(out), *extra])


def _tree(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("where", ["run", "run/00_images", "link-to-run/exported"])
def test_an_image_root_in_the_run_folder_is_refused_before_anything_is_written(tmp_path, capsys, where):
    from toy_llava_run import finished_llava_run

    run_dir = finished_llava_run(tmp_path)
    (tmp_path / "link-to-run").symlink_to(run_dir)  # a planted link: the real folder is what counts
    before = _tree(tmp_path)
    assert _export(run_dir, tmp_path / "out" / "data.json", "--image-root", str(tmp_path / where)) == 2
    err = capsys.readouterr().err
    assert f"the image folder {tmp_path / where}" in err and f"lies in the run folder {run_dir}" in err
    assert "nothing was written" in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_an_image_root_in_the_image_store_is_refused(tmp_path):
    from processors.publish.export import ImageRootError, export_llava
    from loaders.images.paths import trusted_image_resolver
    from toy_llava_run import finished_llava_run

    run_dir = finished_llava_run(tmp_path)
    store = tmp_path / "store"  # a run.store_dir outside the run folder
    store.mkdir()
    with pytest.raises(ImageRootError, match=f"lies in the run's image store {store}"):
        export_llava(run_dir, tmp_path / "out" / "data.json", resolve_image=trusted_image_resolver(run_dir),
                     image_root=store / "x", protected=[store])
    assert not (tmp_path / "out").exists() and _tree(store) == []


def test_a_directory_symlink_planted_in_the_image_root_is_not_followed(tmp_path, capsys):
    from toy_llava_run import finished_llava_run

    run_dir = finished_llava_run(tmp_path)
    images, elsewhere = tmp_path / "out" / "images", tmp_path / "elsewhere"
    images.mkdir(parents=True)
    elsewhere.mkdir()
    (images / "toy").symlink_to(elsewhere)  # the export's links for root "toy" would land in elsewhere/
    assert _export(run_dir, tmp_path / "out" / "data.json") == 2
    err = capsys.readouterr().err
    assert f"{images / 'toy'} inside the image folder {images} is a symlink to {elsewhere}" in err
    assert _tree(elsewhere) == [] and not (tmp_path / "out" / "data.json").exists()


def test_dot_dot_in_the_paths_resolves_like_the_file_system_and_a_file_is_refused(tmp_path, capsys):
    from toy_llava_run import finished_llava_run

    run_dir = finished_llava_run(tmp_path)
    # `out` does not exist: `out/../x` is `x` (before: FileExistsError making `out/..`)
    up = tmp_path / "out" / ".."
    assert _export(run_dir, up / "data.json", "--image-root", str(up / "x")) == 0
    assert (tmp_path / "data.json").is_file() and len(list((tmp_path / "x" / "toy").iterdir())) == 3
    assert not (tmp_path / "out").exists()
    (tmp_path / "a-file").write_text("not a folder")
    assert _export(run_dir, tmp_path / "o2" / "data.json", "--image-root", str(tmp_path / "a-file")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# -- what the LLaVA JSON holds ------------------------------------------------------------------------
def test_the_llava_json_carries_no_control_characters(tmp_path, monkeypatch):
    import datasets

    import processors.publish.export as export

    final = datasets.Dataset.from_list([{
        "id": "q-1", "image": "toy/a\x01.png", "task_type": "OCR~Signs\x1b[0m",
        "conversations": [{"from": "human", "value": "<image>\nWhat does it\x00 say?\x1b[31m"},
                          {"from": "gpt", "value": "STOP\x07\r\n\x85second line\tend"}]}])
    monkeypatch.setattr(export, "require_intact_stage", lambda run_dir, stage: None)
    monkeypatch.setattr(export, "load_stage_output", lambda run_dir, stage: final)
    (record,) = export.llava_records(tmp_path)
    assert record["task_type"] == "OCR~Signs" and record["image"] == "toy/a\x01.png"  # a path stays as it is
    assert [turn["value"] for turn in record["conversations"]] == ["<image>\nWhat does it say?",
                                                                  "STOP\nsecond line\tend"]


# -- a full disk: every write failure names the file, says what is complete, leaves no temporary -----------
@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    from toy_llava_run import finished_llava_run

    return finished_llava_run(tmp_path_factory.mktemp("llava"))


def _enospc(filename=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([filename] if filename else []))


def _full_when_writing(monkeypatch, name: str) -> None:
    """A disk that fills up part-way through writing a file called ``name`` (or its temporary): some bytes
    land, then ENOSPC, with no file name on the error, as a real write() reports it."""
    real_open = Path.open

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[:10])
            raise _enospc()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def open_(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return Full(handle) if self.name.endswith(name) and "w" in mode else handle

    monkeypatch.setattr(Path, "open", open_)


def _leftovers(*folders: Path) -> list[str]:
    return [str(p) for folder in folders if folder.exists() for p in folder.rglob("*")
            if p.name.startswith(rf.TMP_PREFIX) or p.name.startswith("tmp")]


def test_export_into_a_full_disk_at_the_browser_names_the_page_and_says_the_json_is_complete(
        llava_run, tmp_path, monkeypatch, capsys):
    from taskgalaxy import main

    out = tmp_path / "export" / "data.json"
    _full_when_writing(monkeypatch, "index.html")
    assert main(["export", str(llava_run), "--llava", str(out)]) == rf.EXIT_IO
    err = capsys.readouterr().err
    page = tmp_path / "export" / "browser" / "index.html"
    assert f"could not write the sample browser ({page}): the disk is full [errno {errno.ENOSPC}]" in err, err
    assert "No partial page is left" in err and "the LLaVA JSON" in err and "is complete" in err
    assert "df -h" in err and "OSError" not in err
    assert len(json.loads(out.read_text())) == 3  # what it says is complete, is
    assert not page.exists() and not _leftovers(tmp_path, llava_run)


def _fail_json_write(monkeypatch):
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode and os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".tmp-data.json"):
            handle.write = lambda data: (_ for _ in ()).throw(_enospc())
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def _fail_copy(monkeypatch):
    monkeypatch.setattr(shutil, "copyfile", lambda *a, **k: (_ for _ in ()).throw(_enospc()))


@pytest.mark.parametrize("fail, doing, where", [
    (_fail_copy, "copy an image", "export/images/toy/a.png"),
    (_fail_json_write, "write the LLaVA JSON", "export/data.json"),
])
def test_an_export_write_that_fails_names_the_file_and_takes_everything_back(
        llava_run, tmp_path, monkeypatch, capsys, fail, doing, where):
    if fail is _fail_json_write and not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc here")
    from taskgalaxy import main

    fail(monkeypatch)
    assert main(["export", str(llava_run), "--llava", str(tmp_path / "export" / "data.json"), "--copy-images"]) \
        == rf.EXIT_IO
    err = capsys.readouterr().err
    assert f"could not {doing} ({tmp_path / where}): the disk is full" in err, err
    assert "Nothing was exported" in err and "rerun `taskgalaxy export`" in err
    assert not (tmp_path / "export").exists() and not _leftovers(tmp_path, llava_run)


@pytest.mark.parametrize("fail, where", [
    (lambda mp: _full_when_writing(mp, "index.html"), "browser/index.html"),
    (lambda mp: _full_when_writing(mp, "README.md"), "README.md"),
    (_fail_copy, "plots"),
    (lambda mp: mp.setattr("datasets.Dataset.to_parquet", lambda *a, **k: (_ for _ in ()).throw(_enospc())),
     "images"),
])
def test_a_push_write_that_fails_names_the_file_and_publishes_nothing(llava_run, tmp_path, monkeypatch, capsys,
                                                                      fail, where):
    from taskgalaxy import main

    hub = tmp_path / "hub"
    plot = next(llava_run.glob("[0-9][0-9]_final")) / "extra_plot.png"
    if where == "plots":  # give the run a plot to copy
        plot.write_bytes(b"\x89PNG")
    fail(monkeypatch)
    try:
        assert main(["push", str(llava_run), "--local-dir", str(hub)]) == rf.EXIT_IO
    finally:
        plot.unlink(missing_ok=True)
    err = capsys.readouterr().err
    assert f"({hub / where}" in err and "the disk is full" in err, err
    assert f"Nothing was published: {hub} is as it was" in err and "rerun `taskgalaxy push`" in err
    assert not hub.exists() and not _leftovers(tmp_path, llava_run)
