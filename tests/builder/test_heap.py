"""The runner freezes what is alive before a large stage's shards run (``builder.heap``), so the collector does
not walk earlier stages' objects on every full collection, and thaws it afterwards."""

from __future__ import annotations

import gc

import pytest

from builder import heap
from builder.config import build_config_model, validate_config
from builder.runner import Runner
from toy_stages import Numbers, Square


class _Garbage:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it


def test_a_large_block_runs_frozen_and_thaws_after():
    assert gc.get_freeze_count() == 0
    with heap.frozen_heap(heap.FREEZE_MIN_ROWS) as frozen:
        assert frozen and gc.get_freeze_count() > 0
        inside = _Garbage()
    assert gc.get_freeze_count() == 0
    del inside
    assert gc.collect() >= 1  # made inside the block, let go after it: collected as usual


def test_a_small_block_is_left_alone_and_so_is_a_nested_one():
    with heap.frozen_heap(heap.FREEZE_MIN_ROWS - 1) as frozen:
        assert not frozen and gc.get_freeze_count() == 0
    with heap.frozen_heap(heap.FREEZE_MIN_ROWS) as outer:
        with heap.frozen_heap(10**9) as inner:
            assert outer and not inner
        assert gc.get_freeze_count() > 0  # the inner block did not thaw what the outer one froze
    assert gc.get_freeze_count() == 0


class _FreezeRecordingSquare(Square):
    seen: list[int] = []

    def make_batch_fn(self, config, ctx):
        fn = super().make_batch_fn(config, ctx)

        def recording(batch):
            _FreezeRecordingSquare.seen.append(gc.get_freeze_count())
            return fn(batch)

        return recording


@pytest.mark.parametrize("min_rows,frozen", [(4, True), (10**6, False)])
def test_the_runner_freezes_only_a_stage_with_enough_rows(tmp_path, monkeypatch, min_rows, frozen):
    monkeypatch.setattr(heap, "FREEZE_MIN_ROWS", min_rows)
    monkeypatch.setattr(_FreezeRecordingSquare, "seen", [])
    stages = [Numbers(), _FreezeRecordingSquare()]
    config = validate_config({"run": {"name": "toy", "shard_size": 4},
                              "stages": {"numbers": {"count": 8}, "square": {}}},
                             build_config_model(stages), base_dir=tmp_path)
    Runner(stages, config, tmp_path / "run", progress=False).run()
    assert _FreezeRecordingSquare.seen and all((count > 0) == frozen for count in _FreezeRecordingSquare.seen)
    assert gc.get_freeze_count() == 0
