"""CLIP matching against brute-force references: top-k, true cosine, the DataLoader path, bad images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from processors.clip.config import ClipMatchConfig
from processors.clip.images import ImageError, crop_extreme_aspect, split_preprocess
from processors.clip.matcher import ClipMatcher
from processors.clip.text import normalize_rows, task_text
from processors.clip.topk import topk_cosine
from processors.imageio import open_rgb

TASKS = [f"Area {a}~Skill {a}.{b}~Leaf {a}.{b}.{c}" for a in range(3) for b in range(4) for c in range(5)]
TASK_IDS = [f"t{i:03d}" for i in range(len(TASKS))]



def tiny(**overrides) -> ClipMatchConfig:
    values = dict(model="tg-tiny-clip", pretrained=None, device="cpu", batch_size=3, num_workers=0, top_k=5)
    return ClipMatchConfig(**{**values, **overrides})


def draw_images(folder, count: int, size=(64, 48)) -> list:
    """Distinct pictures: coloured background, a rectangle and an ellipse placed by a seeded generator."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        draw.rectangle([x, y, x + size[0] // 3, y + size[1] // 3], fill=fill)
        draw.ellipse([size[0] // 2, 5, size[0] - 2, size[1] - 5], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(path)
    return paths


def reference_topk(matcher: ClipMatcher, image_paths, task_paths, k):
    """Brute force in numpy from the raw (unnormalised) model outputs, each vector normalised on its own."""
    import torch

    clip = matcher.clip
    with torch.inference_mode():
        pixels = torch.stack([clip.preprocess(open_rgb(p)) for p in image_paths])
        images = clip.model.encode_image(pixels).numpy().astype(np.float64)
        texts = clip.model.encode_text(clip.tokenizer([task_text(p) for p in task_paths])).numpy().astype(np.float64)
    cosine = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in texts] for a in images])
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return cosine, order


def run_match(matcher, paths) -> dict:
    return dict(matcher.match(paths))


def test_topk_equals_numpy_reference_and_scores_are_cosines(tmp_path):
    paths = draw_images(tmp_path, 7)
    matcher = ClipMatcher(tiny(top_k=5), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    results = run_match(matcher, paths)
    cosine, order = reference_topk(matcher, paths, TASKS, 5)
    assert sorted(results) == list(range(7))
    for i in range(7):
        got = results[i]
        assert [c["task_id"] for c in got] == [TASK_IDS[j] for j in order[i]]
        assert [c["task_type"] for c in got] == [TASKS[j] for j in order[i]]
        np.testing.assert_allclose([c["score"] for c in got], cosine[i, order[i]], atol=1e-5)
        assert all(a["score"] >= b["score"] for a, b in zip(got, got[1:]))


def test_scores_do_not_depend_on_other_task_types(tmp_path):
    """Regression for the released code's axis bug: per-dimension normalisation across the task list made a
    task's score change when other task types were added or rescaled."""
    paths = draw_images(tmp_path, 4)
    matcher = ClipMatcher(tiny(top_k=len(TASKS)), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS[:20], TASKS[:20])
    small = {i: {c["task_id"]: c["score"] for c in cands} for i, cands in run_match(matcher, paths).items()}
    matcher.set_tasks(TASK_IDS, TASKS)
    full = {i: {c["task_id"]: c["score"] for c in cands} for i, cands in run_match(matcher, paths).items()}
    for i in small:
        for task_id, score in small[i].items():
            assert full[i][task_id] == pytest.approx(score, abs=1e-6)


def test_scaling_one_vector_leaves_every_score_unchanged():
    import torch

    generator = torch.Generator().manual_seed(0)
    texts, images = torch.randn(50, 16, generator=generator), torch.randn(6, 16, generator=generator)
    scaled = texts.clone()
    scaled[7] *= 13.0
    base_scores, base_index = topk_cosine(normalize_rows(images), normalize_rows(texts), k=50)
    new_scores, new_index = topk_cosine(normalize_rows(images), normalize_rows(scaled), k=50)
    assert torch.equal(base_index, new_index)
    torch.testing.assert_close(base_scores, new_scores)
    expected = torch.nn.functional.cosine_similarity(images[:, None, :], texts[None, :, :], dim=-1)
    torch.testing.assert_close(base_scores, expected.gather(1, base_index), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_topk_equals_one_shot(chunk):
    import torch

    generator = torch.Generator().manual_seed(1)
    texts = normalize_rows(torch.randn(300, 8, generator=generator))
    images = normalize_rows(torch.randn(5, 8, generator=generator))
    scores, index = topk_cosine(images, texts, k=10, chunk_size=chunk)
    expected = (images @ texts.T).topk(10, dim=1)
    assert torch.equal(index, expected.indices)
    torch.testing.assert_close(scores, expected.values)
    assert topk_cosine(images, texts[:3], k=10)[0].shape == (5, 3)  # k larger than the bank: all of it


def test_dataloader_with_workers_and_bad_images_fail_only_their_rows(tmp_path):
    paths = draw_images(tmp_path, 8)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:40])  # truncated JPEG header
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a picture")
    paths = paths[:3] + [broken] + paths[3:6] + [tmp_path / "missing.jpg", not_image] + paths[6:]
    serial = ClipMatcher(tiny(num_workers=0), tmp_path / "cache")
    serial.set_tasks(TASK_IDS, TASKS)
    parallel = ClipMatcher(tiny(num_workers=2), tmp_path / "cache")
    parallel.set_tasks(TASK_IDS, TASKS)
    expected, got = run_match(serial, paths), run_match(parallel, paths)
    assert sorted(got) == list(range(len(paths)))
    bad = {i: r for i, r in got.items() if isinstance(r, ImageError)}
    assert {i: r.reason for i, r in bad.items()} == {3: "image_corrupt", 7: "image_missing", 8: "image_corrupt"}
    for i, result in got.items():
        if i not in bad:
            assert [c["task_id"] for c in result] == [c["task_id"] for c in expected[i]]
            np.testing.assert_allclose([c["score"] for c in result], [c["score"] for c in expected[i]], atol=1e-6)


def test_a_batch_of_only_bad_images_between_good_ones_keeps_every_row_once_in_order(tmp_path):
    # batch_size 3: the middle batch holds no readable image, so the one-batch-in-flight loop must hand
    # back the first batch's results before that batch's errors, and carry on with the third.
    good = draw_images(tmp_path, 6)
    bad = [tmp_path / f"missing{i}.jpg" for i in range(3)]
    paths = good[:3] + bad + good[3:]
    matcher = ClipMatcher(tiny(batch_size=3), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    order = [position for position, _ in matcher.match(paths)]
    assert order == list(range(9))
    results = run_match(matcher, paths)
    assert {i for i, r in results.items() if isinstance(r, ImageError)} == {3, 4, 5}
    alone = run_match(matcher, good[3:])  # the third batch scores as it does on its own
    assert [[c["task_id"] for c in results[6 + i]] for i in range(3)] == [[c["task_id"] for c in alone[i]] for i in range(3)]


def test_small_worker_batches_joined_into_exactly_full_model_batches_score_the_same(tmp_path):
    # batch_size 64 -> workers hand over 32-image batches, joined into model batches of exactly 64 readable
    # images even when some images fail (a compiled tower takes one shape; a batch of 65 would run eager).
    good = draw_images(tmp_path, 20)
    paths = (good * 5)[:95] + [tmp_path / "missing.jpg"]
    paths.insert(40, tmp_path / "gone.jpg")
    paths.insert(10, tmp_path / "lost.jpg")
    joined = ClipMatcher(tiny(batch_size=64, num_workers=2), tmp_path / "cache")
    joined.set_tasks(TASK_IDS, TASKS)
    sizes = [len(batch.indices) for batch in joined.iter_batches(paths)]
    assert sizes == [64, 31] and sum(sizes) == len(paths) - 3
    plain = ClipMatcher(tiny(batch_size=3), tmp_path / "cache")
    plain.set_tasks(TASK_IDS, TASKS)
    got, expected = list(joined.match(paths)), run_match(plain, paths)
    assert sorted(i for i, _ in got) == list(range(len(paths)))
    got = dict(got)
    assert {i for i, r in got.items() if isinstance(r, ImageError)} == {10, 41, 97}
    for i, result in got.items():
        if not isinstance(result, ImageError):
            assert [c["task_id"] for c in result] == [c["task_id"] for c in expected[i]]


def test_worker_processes_persist_across_calls_and_an_abandoned_pass_does_not_leak_into_the_next(tmp_path):
    import multiprocessing

    paths = draw_images(tmp_path, 12)
    matcher = ClipMatcher(tiny(batch_size=2, num_workers=2), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    first = run_match(matcher, paths[:6])
    workers = {p.pid for p in multiprocessing.active_children()}
    assert len(workers) >= 2
    partial = matcher.match(paths[6:])
    next(partial), next(partial)  # a shard that stops early (an error downstream), mid-pass
    partial.close()
    second = run_match(matcher, paths[:6])  # a new pass after the abandoned one gets only its own rows
    assert {p.pid for p in multiprocessing.active_children()} == workers  # no new forks
    assert sorted(second) == list(range(6))
    assert all([c["task_id"] for c in first[i]] == [c["task_id"] for c in second[i]] for i in range(6))


def test_one_pass_at_a_time_per_matcher(tmp_path):
    paths = draw_images(tmp_path, 6)
    matcher = ClipMatcher(tiny(batch_size=2), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    first = matcher.match(paths)
    next(first)
    with pytest.raises(RuntimeError, match="pass is still open"):
        next(matcher.match(paths[:2]))  # would have taken over the first pass's stream
    rest = list(first)  # the first pass is untouched and ends normally
    assert [i for i, _ in rest] == [1, 2, 3, 4, 5]
    assert sorted(run_match(matcher, paths[:2])) == [0, 1]


def test_a_decode_worker_killed_between_passes_is_replaced_at_the_next_pass(tmp_path, caplog):
    import multiprocessing
    import os
    import signal

    paths = draw_images(tmp_path, 8)
    matcher = ClipMatcher(tiny(batch_size=2, num_workers=2), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    expected = run_match(matcher, paths)
    victims = multiprocessing.active_children()
    try:
        os.kill(victims[0].pid, signal.SIGKILL)
        victims[0].join(timeout=10)
    except RuntimeError as exc:  # torch's SIGCHLD handler reports the death wherever the main thread is
        assert "DataLoader worker" in str(exc)
    again = run_match(matcher, paths)
    assert "decode worker died between passes" in caplog.text
    assert {p.pid for p in multiprocessing.active_children()}.isdisjoint({v.pid for v in victims})
    assert all([c["task_id"] for c in again[i]] == [c["task_id"] for c in expected[i]] for i in range(8))


def test_close_stops_the_workers_and_a_later_pass_starts_new_ones(tmp_path):
    import multiprocessing

    paths = draw_images(tmp_path, 4)
    matcher = ClipMatcher(tiny(batch_size=2, num_workers=2), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    before = {p.pid for p in multiprocessing.active_children()}
    first = run_match(matcher, paths)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2
    matcher.close()
    assert workers.isdisjoint(p.pid for p in multiprocessing.active_children())
    again = run_match(matcher, paths)
    assert all([c["task_id"] for c in again[i]] == [c["task_id"] for c in first[i]] for i in range(4))
    matcher.close()


def fails_to_compile(graph_module, example_inputs):
    raise RuntimeError("no C compiler here")


@pytest.mark.parametrize("backend", ["eager", fails_to_compile])
def test_compiled_image_tower_pads_short_batches_and_falls_back_to_eager_when_compiling_fails(tmp_path, backend, caplog):
    # backend "eager" runs torch.compile's tracing without generating code (seconds on a CPU); the GPU uses
    # inductor. 7 images in batches of 4: the second batch is padded to the compiled shape.
    paths = draw_images(tmp_path, 7)
    plain = ClipMatcher(tiny(batch_size=4, compile=False), tmp_path / "cache")
    plain.set_tasks(TASK_IDS, TASKS)
    compiled = ClipMatcher(tiny(batch_size=4, compile=True), tmp_path / "cache", compile_backend=backend)
    compiled.set_tasks(TASK_IDS, TASKS)
    expected, got = run_match(plain, paths), run_match(compiled, paths)
    assert compiled.compiled is (backend == "eager")
    assert ("running eager" in caplog.text) is (backend != "eager")
    assert not plain.compiled and sorted(got) == list(range(7))
    for i in range(7):
        assert [c["task_id"] for c in got[i]] == [c["task_id"] for c in expected[i]]
        np.testing.assert_allclose([c["score"] for c in got[i]], [c["score"] for c in expected[i]], atol=1e-5)


def test_compile_auto_is_off_on_the_cpu(tmp_path):
    matcher = ClipMatcher(tiny(), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    run_match(matcher, draw_images(tmp_path, 2))
    assert matcher.config.compile == "auto" and not matcher.compiled


@pytest.mark.parametrize(
    ("workers", "prefetch", "batch_mib", "shm_mib", "expected"),
    [
        (15, 4, 38, 24 * 1024, (15, 4)),  # a roomy /dev/shm changes nothing
        (15, 4, 38, 2048, (15, 1)),  # 1 GiB budget: prefetch drops first (15 batches in flight still fit)
        (15, 4, 38, 512, (6, 1)),  # 256 MiB budget: then workers
        (15, 4, 38, 64, (1, 1)),  # Docker's default 64 MB: the floor is one worker, one batch (and a warning)
        (0, 4, 38, 64, (0, 4)),  # no workers: batches never touch shared memory
        (4, 2, 38, None, (4, 2)),  # unknown free space: leave the config alone
    ],
)
def test_workers_and_prefetch_fit_half_the_free_shared_memory(workers, prefetch, batch_mib, shm_mib, expected, caplog):
    from processors.clip.images import fit_workers_to_shm

    shm = None if shm_mib is None else shm_mib << 20
    got = fit_workers_to_shm(workers, prefetch, batch_mib << 20, shm)
    assert got == expected
    if shm is not None and workers and got != (workers, prefetch):
        assert got[0] * got[1] * (batch_mib << 20) <= shm // 2 or got == (1, 1)
        assert "--shm-size" in caplog.text
    else:
        assert "--shm-size" not in caplog.text


def test_aspect_guard_keeps_pixels_and_bounds_strips(tmp_path):
    from processors.clip.models import load_clip

    preprocess = load_clip("tg-tiny-clip", None, "cpu", "fp32").preprocess
    rng = np.random.default_rng(3)
    tall = Image.fromarray(rng.integers(0, 255, (500, 100, 3), dtype=np.uint8))
    cropped = crop_extreme_aspect(tall)
    assert cropped.size == (100, 300)
    np.testing.assert_allclose(preprocess(cropped).numpy(), preprocess(tall).numpy(), atol=1e-5)
    strip = Image.new("RGB", (20000, 1), (10, 200, 30))
    assert crop_extreme_aspect(strip).size == (3, 1)
    assert tuple(preprocess(crop_extreme_aspect(strip)).shape) == (3, 32, 32)


def test_uint8_worker_tensors_normalise_to_the_full_transform(tmp_path):
    import torch

    from processors.clip.models import load_clip

    preprocess = load_clip("tg-tiny-clip", None, "cpu", "fp32").preprocess
    split = split_preprocess(preprocess)
    image = open_rgb(draw_images(tmp_path, 1, size=(90, 50))[0])
    small = split.to_uint8(image)
    assert small.dtype == torch.uint8 and tuple(small.shape) == (3, 32, 32)
    torch.testing.assert_close(split.normalize(small[None])[0], preprocess(image), atol=0, rtol=0)
    assert split_preprocess(lambda image: image) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_a_prefetched_next_pass_gives_the_same_results_and_the_loader_decodes_only_the_rest(tmp_path, workers,
                                                                                             monkeypatch):
    # The engine hints the next shard while this one computes (fn.prefetch): its first model batch is decoded
    # ahead; the pass then takes those and its loader decodes the rest only, positions unchanged.
    paths = draw_images(tmp_path, 9)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:40])
    first = paths[:1] + [broken] + paths[1:4]  # a bad image in the prefetched head (batch_size 3)
    second = paths[4:] + [tmp_path / "missing.jpg"]
    plain = ClipMatcher(tiny(num_workers=0), tmp_path / "cache")
    plain.set_tasks(TASK_IDS, TASKS)
    expected = [run_match(plain, first), run_match(plain, second)]

    matcher = ClipMatcher(tiny(num_workers=workers, batch_size=4), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    from processors.clip import images

    sampled: list[list[str]] = []
    real_set = images.PathBatches.set_paths
    monkeypatch.setattr(images.PathBatches, "set_paths",
                        lambda self, p: (sampled.append([str(x) for x in p]), real_set(self, p))[1])
    try:
        matcher.prefetch(first)
        got_first = run_match(matcher, first)
        matcher.prefetch(second)
        matcher.prefetch(["/not/the/next/pass.png"])  # a hint that turns out wrong is dropped
        got_second = run_match(matcher, second)
        matcher.prefetch(second)
        got_again = run_match(matcher, second)
    finally:
        matcher.close()
    assert sampled[0] == [str(p) for p in first[4:]]  # the loader decoded only what the head did not hold
    assert sampled[1] == [str(p) for p in second]  # the wrong hint: the whole pass through the loader
    assert sampled[2] == [str(p) for p in second[4:]]
    for got, want in ((got_first, expected[0]), (got_second, expected[1]), (got_again, expected[1])):
        assert sorted(got) == sorted(want)
        for i, result in want.items():
            if isinstance(result, ImageError):
                assert got[i].reason == result.reason
            else:
                assert [c["task_id"] for c in got[i]] == [c["task_id"] for c in result]
                np.testing.assert_allclose([c["score"] for c in got[i]], [c["score"] for c in result], atol=1e-6)


def test_on_batch_is_called_per_model_batch_and_what_it_raises_is_not_a_loading_failure(tmp_path, caplog):
    paths = draw_images(tmp_path, 7)
    matcher = ClipMatcher(tiny(batch_size=3, num_workers=1), tmp_path / "cache")
    matcher.set_tasks(TASK_IDS, TASKS)
    calls: list[int] = []
    try:
        assert sorted(dict(matcher.match(paths, on_batch=lambda: calls.append(1)))) == list(range(7))
        assert len(calls) == 3  # 3 + 3 + 1 images
        loader = matcher._loader

        def stop() -> None:  # a stopped shard (the match stage raises ShardStopped here)
            raise InterruptedError("stop")

        with pytest.raises(InterruptedError):
            list(matcher.match(paths, on_batch=stop))
        assert matcher._loader is loader and "loading failed" not in caplog.text  # the workers are kept
        assert sorted(run_match(matcher, paths)) == list(range(7))
    finally:
        matcher.close()
