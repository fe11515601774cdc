"""Export and push never delete files they did not make."""

from __future__ import annotations

import pytest

from builder.export import _place_image
from builder.publish import MARKER, _refuse_foreign_folder, _swap_into_place


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
