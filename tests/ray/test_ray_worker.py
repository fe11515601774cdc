"""Ray workers: several opening a new request cache at once all succeed (the WAL-switch race is retried), and
a worker refuses to work on a node that does not see an image root (naming the root and the node)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


def test_workers_opening_a_new_request_cache_at_once_all_succeed(ray_cluster, tmp_path):
    import ray

    from processors.llm.api import DRY_RUN_CACHE_FILE
    from processors.llm.cache import RequestCache

    @ray.remote(num_cpus=0.5)
    def open_and_write(cache_dir: str, key: str) -> str:
        from processors.llm.cache import RequestCache as Cache

        with Cache(f"{cache_dir}/{DRY_RUN_CACHE_FILE}") as cache:  # the WAL switch of a new file is retried
            cache.put(key, {"text": key})
        return key

    for attempt in range(5):  # a fresh file each time: the race is at its creation
        folder = tmp_path / f"cache-{attempt}"
        keys = ray.get([open_and_write.remote(str(folder), f"k{i}") for i in range(4)])
        with RequestCache(folder / DRY_RUN_CACHE_FILE) as cache:
            assert sorted(cache.get_many(keys)) == sorted(keys)


def test_a_node_that_does_not_see_an_image_root_is_refused_by_name(tmp_path):
    from builder.ray_tasks import WorkerStorageError
    from processors.ray_worker import check_image_roots

    run_dir = tmp_path / "run"
    (run_dir / "01_images").mkdir(parents=True)
    (run_dir / "01_images" / "state.json").write_text("{}")
    gone = tmp_path / "photos-on-nfs"
    (run_dir / "01_images" / "image_roots.json").write_text(json.dumps({
        "store": {"relative_to_run": "images"},  # not created yet: the images stage is about to fill it
        "photos": {"absolute": str(gone)},
    }))
    with pytest.raises(WorkerStorageError) as caught:
        check_image_roots(SimpleNamespace(run_dir=run_dir))
    assert str(gone) in str(caught.value) and "node " in str(caught.value)
    gone.mkdir()
    check_image_roots(SimpleNamespace(run_dir=run_dir))  # mounted: nothing to say
