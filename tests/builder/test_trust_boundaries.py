"""What leaves the machine is read only from where the run's config said: ``image_roots.json`` is a file in
the run folder, and a root it points elsewhere (``/etc``) is refused by ``export`` and ``push``. A refused or
failed export or push leaves no partial output, and a previous one as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from builder import runfolder as rf
from loaders.images.paths import ROOTS_FILE
from taskgalaxy import main
from toy_llava_run import finished_llava_run, make_pictures


def _roots_file(run_dir: Path) -> Path:
    return run_dir / "00_images" / ROOTS_FILE


def _point_root(run_dir: Path, spec: dict) -> None:
    """What a hostile (or careless) edit of the run folder does."""
    _roots_file(run_dir).write_text(json.dumps({"toy": spec}))


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_export_does_not_link_etc_passwd_through_an_edited_roots_file(tmp_path, capsys):
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd here")
    pictures = make_pictures(tmp_path / "pictures", names=("a.png", "passwd"))
    run_dir = finished_llava_run(tmp_path, pictures)
    _point_root(run_dir, {"absolute": "/etc"})
    out = tmp_path / "export" / "data.json"
    assert main(["export", str(run_dir), "--llava", str(out)]) == rf.EXIT_DATA
    err = capsys.readouterr().err
    assert f"image root 'toy' in {_roots_file(run_dir)} points to /etc" in err
    assert "no folder the images stage's config" in err and "--stages images" in err
    assert not out.parent.exists(), "a refused export left output behind"


@pytest.mark.parametrize("spec", [{"absolute": "SECRET"}, {"relative_to_run": "../secret"}])
def test_export_and_push_refuse_a_root_the_config_did_not_name(tmp_path, capsys, spec):
    run_dir = finished_llava_run(tmp_path)
    make_pictures(tmp_path / "secret")  # same names as the real pictures, other bytes
    _point_root(run_dir, {k: v.replace("SECRET", str(tmp_path / "secret")) for k, v in spec.items()})
    before = _listing(tmp_path)
    assert main(["export", str(run_dir), "--llava", str(tmp_path / "export" / "data.json")]) == rf.EXIT_DATA
    assert main(["push", str(run_dir), "--local-dir", str(tmp_path / "hub")]) == rf.EXIT_DATA
    assert capsys.readouterr().err.count("refusing to read images from it") == 2
    assert _listing(tmp_path) == before, "a refused export or push left something behind"


def test_roots_the_config_names_or_inside_the_run_folder_are_trusted(tmp_path, capsys):
    run_dir = finished_llava_run(tmp_path)
    assert main(["export", str(run_dir), "--llava", str(tmp_path / "a" / "data.json")]) == 0  # the config's folder
    shutil.copytree(tmp_path / "pictures", run_dir / "kept")  # e.g. the default store, <run>/images
    _point_root(run_dir, {"relative_to_run": "kept"})
    assert main(["export", str(run_dir), "--llava", str(tmp_path / "b" / "data.json")]) == 0
    link = next((tmp_path / "b" / "images" / "toy").iterdir())
    assert link.resolve().parent == (run_dir / "kept").resolve()
    umask = os.umask(0)
    os.umask(umask)
    for made, mode in ((tmp_path / "b" / "images", 0o777), (tmp_path / "b" / "data.json", 0o666)):
        assert made.stat().st_mode & 0o777 == mode & ~umask, made  # others may read what was exported


def test_a_refused_push_leaves_the_previous_push_as_it_was(tmp_path):
    run_dir = finished_llava_run(tmp_path)
    hub = tmp_path / "hub"
    assert main(["push", str(run_dir), "--local-dir", str(hub)]) == 0
    before = {name: (hub / name).read_bytes() for name in _listing(hub) if (hub / name).is_file()}
    make_pictures(tmp_path / "secret")
    _point_root(run_dir, {"absolute": str(tmp_path / "secret")})
    assert main(["push", str(run_dir), "--local-dir", str(hub)]) == rf.EXIT_DATA
    assert {name: (hub / name).read_bytes() for name in _listing(hub) if (hub / name).is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "pictures", "run", "secret"]


def test_push_writes_nothing_into_the_run_folder(tmp_path):
    run_dir = finished_llava_run(tmp_path)
    before = _listing(run_dir)
    assert main(["push", str(run_dir), "--local-dir", str(tmp_path / "hub")]) == 0
    assert _listing(run_dir) == before  # `datasets` used to leave a cache-*.arrow of every embedded image there
    assert not [p for p in (tmp_path / "hub").rglob("*") if p.name.startswith(("cache-", rf.TMP_PREFIX, "tmp"))]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "hub").stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700


def test_an_export_that_fails_half_way_leaves_no_partial_output(tmp_path, monkeypatch):
    run_dir = finished_llava_run(tmp_path)
    real, copies = shutil.copyfile, []

    def full_after_one(source, target, *args, **kwargs):
        copies.append(target)
        if len(copies) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_after_one)
    before = _listing(tmp_path)
    out = tmp_path / "export" / "data.json"
    assert main(["export", str(run_dir), "--llava", str(out), "--copy-images"]) != 0
    assert len(copies) == 2 and _listing(tmp_path) == before


def test_a_failed_re_export_leaves_the_previous_export_as_it_was(tmp_path, monkeypatch):
    run_dir = finished_llava_run(tmp_path)
    out = tmp_path / "export" / "data.json"
    assert main(["export", str(run_dir), "--llava", str(out)]) == 0
    previous_json = out.read_bytes()
    lost = tmp_path / "export" / "images" / "toy" / "b.png"
    lost.unlink()  # the re-export has a link to make, and the disk is full
    before = _listing(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "symlink", full)
    assert main(["export", str(run_dir), "--llava", str(out)]) != 0
    assert out.read_bytes() == previous_json and _listing(tmp_path) == before
    monkeypatch.undo()
    (tmp_path / "pictures" / "c.png").unlink()  # a missing image is refused before anything is written
    assert main(["export", str(run_dir), "--llava", str(out)]) != 0
    assert out.read_bytes() == previous_json and not lost.exists()
