"""A damaged request cache stops the run with exit 65, the file named and what to do; it is never set aside."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from llm_helpers import json_requests

from builder.runfolder import EXIT_DATA, RunFolderError
from processors.llm import run_requests
from processors.llm.api import CACHE_FILE
from processors.llm import cache as cache_module
from processors.llm.cache import CacheDamagedError, RequestCache

REPLY = {"text": '{"labels": ["OCR"]}', "finish_reason": "stop", "usage": {"prompt_tokens": 9, "completion_tokens": 4},
         "logprobs": None}
ROWS = 3000  # ~100 pages of 4 KiB: damage in the middle lies in pages the first look-up never reads


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> bytes:
    """The bytes of a checkpointed cache of ``ROWS`` replies (kept on disk: its inode is never reused)."""
    path = tmp_path_factory.mktemp("healthy") / "cache.sqlite"
    with RequestCache(path) as cache:
        cache.put_many([(f"key-{i:05d}", REPLY) for i in range(ROWS)])
    return path.read_bytes()


@pytest.fixture(autouse=True)
def unchecked(monkeypatch):
    """No file counts as checked already (an inode freed by another test may be reused by these files)."""
    monkeypatch.setattr(cache_module, "_CHECKED", set())


def _damaged(folder: Path, data: bytes, how: str) -> Path:
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "overwritten":
        data = b"#!/bin/sh\necho this is not a cache\n" * 40
    elif how == "zeroed_middle":
        middle = len(data) // 2 // 4096 * 4096
        data = data[:middle] + bytes(8192) + data[middle + 8192:]
    path = folder / CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)  # a new file (a new inode): this process has not checked it yet
    return path


@pytest.mark.parametrize("how", ["truncated", "overwritten", "zeroed_middle"])
def test_a_damaged_cache_is_refused_on_open_with_the_file_named_and_left_as_it_is(healthy, tmp_path, how):
    path = _damaged(tmp_path, healthy, how)
    before = path.read_bytes()
    with pytest.raises(CacheDamagedError) as caught:
        RequestCache(path)
    error = caught.value
    assert isinstance(error, RunFolderError) and error.exit_code == EXIT_DATA == 65
    message = str(error)
    assert str(path) in message and "damaged" in message
    assert "paid again" in message and "backup" in message and f"{CACHE_FILE}-wal" in message
    assert path.read_bytes() == before  # not repaired, not set aside: it holds paid answers
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_FILE]


def test_damage_found_by_a_look_up_stops_the_call_the_same_way(healthy, tmp_path):
    path = _damaged(tmp_path, healthy, "none")
    RequestCache(path).close()  # checked whole once in this process: the next open does not check again
    with path.open("r+b") as handle:  # damaged afterwards, in place (same inode): only a look-up can tell
        handle.seek(8192)
        handle.write(bytes(len(healthy) - 8192))
    with RequestCache(path) as cache, pytest.raises(CacheDamagedError, match=str(path)):
        cache.get_many(f"key-{i:05d}" for i in range(ROWS))


def test_a_call_over_a_damaged_cache_pays_for_nothing(healthy, simulator, ctx_for, tmp_path):
    sim = simulator()
    ctx = ctx_for(sim)
    _damaged(Path(ctx.cache_dir), healthy, "truncated")
    with pytest.raises(CacheDamagedError):
        run_requests(json_requests(4), endpoint="sim", ctx=ctx)
    assert sim.stats()["received"] == 0


def test_a_healthy_cache_still_opens_and_a_moved_aside_one_starts_afresh(healthy, tmp_path):
    path = _damaged(tmp_path, healthy, "none")
    with RequestCache(path) as cache:
        assert len(cache) == ROWS
    shutil.move(path, tmp_path / "aside.sqlite")
    with RequestCache(path) as cache:
        assert len(cache) == 0


def test_a_dry_run_over_a_damaged_request_cache_exits_65_naming_it(tmp_path, capsys):
    from processors.llm.api import DRY_RUN_CACHE_FILE
    from taskgalaxy import main

    repo = Path(__file__).resolve().parents[2]
    cache = tmp_path / "run" / "cache" / DRY_RUN_CACHE_FILE
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84 + b"not the rest of a database" * 200)
    code = main(["run", str(repo / "configs" / "demo.yaml"), "--dry-run", "--run-dir", str(tmp_path / "run"),
                 "--stages", "taxonomy", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_DATA == 65, err
    assert str(cache) in err and "paid again" in err
    assert cache.read_bytes().endswith(b"not the rest of a database")  # never set aside or repaired
