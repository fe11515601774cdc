"""Task-type texts, leaf selection and the text-embedding cache."""

from __future__ import annotations

import numpy as np
import pytest

import processors.clip.text as text_module
from processors.clip.config import ClipMatchConfig
from processors.clip.matcher import ClipMatcher
from processors.clip.text import leaf_mask, task_text

PATHS = ["OCR", "OCR~Scene text", "OCR~Scene text~Street sign reading", "Counting~Animals", "Counting~Cars"]
IDS = [f"t{i}" for i in range(len(PATHS))]



def tiny(**overrides) -> ClipMatchConfig:
    values = dict(model="tg-tiny-clip", pretrained=None, device="cpu", num_workers=0, top_k=3)
    return ClipMatchConfig(**{**values, **overrides})


def test_task_text_puts_the_leaf_first():
    assert task_text("OCR~Scene text~Street sign reading") == "Street sign reading (OCR / Scene text)"
    assert task_text(" Counting ") == "Counting"
    with pytest.raises(ValueError):
        task_text("~")


def test_leaves_are_paths_that_are_nobody_s_ancestor():
    assert leaf_mask(PATHS) == [False, False, True, True, True]
    matcher = ClipMatcher(tiny(), "unused")
    assert matcher.select_tasks(IDS, PATHS) == (IDS[2:], PATHS[2:])
    assert ClipMatcher(tiny(task_types="all"), "unused").select_tasks(IDS, PATHS) == (IDS, PATHS)


def count_encodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = text_module.encode_texts

    def counting(clip, texts, batch_size):
        calls.append(len(texts))
        return real(clip, texts, batch_size)

    monkeypatch.setattr(text_module, "encode_texts", counting)
    return calls


def test_text_embeddings_are_cached_across_matchers_and_keyed_by_content(tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch)
    cache = tmp_path / "cache"
    first = ClipMatcher(tiny(text_batch_size=2), cache).set_tasks(IDS, PATHS)
    assert first.source == "computed" and calls == [5]
    norms = np.linalg.norm(first.vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)

    files = list((cache / "clip_text").glob("*.npy"))
    mtime = files[0].stat().st_mtime_ns
    again = ClipMatcher(tiny(top_k=7), cache).set_tasks(IDS, PATHS)  # another run, another config key
    assert again.source == "disk" and calls == [5]
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert files[0].stat().st_mtime_ns == mtime

    changed = ClipMatcher(tiny(), cache).set_tasks(IDS, PATHS[:-1] + ["Counting~Trucks"])
    assert changed.source == "computed" and calls == [5, 5]
    np.testing.assert_allclose(changed.vectors[:4], first.vectors[:4], atol=1e-6)  # per-vector: no mixing
    assert len(list((cache / "clip_text").glob("*.npy"))) == 2
    assert not list((cache / "clip_text").glob(".tmp-*"))
