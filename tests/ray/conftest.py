"""Ray tests: a two-node ``ray.cluster_utils.Cluster`` on this machine (2 logical CPUs per node), shared by
every test of the folder, and a reference run of a small config under the local engine to compare against.
Skipped as a whole when Ray is not installed (it is the optional ``ray`` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_helpers import run_pipeline, write_config


def ray_installed() -> bool:
    # tests/ is on sys.path, so without Ray installed "import ray" finds this folder as a namespace package
    try:
        import ray
    except ImportError:
        return False
    return hasattr(ray, "init")


def pytest_collection_modifyitems(config, items):
    if not ray_installed():
        skip = pytest.mark.skip(reason="Ray is not installed (pip install '.[ray]')")
        for item in items:
            if Path(str(item.fspath)).parent == Path(__file__).parent:
                item.add_marker(skip)


HERE = Path(__file__).parent
_CLUSTERS: list = []


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes on this machine; this process is a driver of it."""
    import ray
    from ray.cluster_utils import Cluster

    from builder.ray_engine import NAMESPACE

    node = {"num_cpus": 2, "object_store_memory": 150 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    _CLUSTERS.append(cluster)
    cluster.add_node(**node)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield cluster
    finally:
        _stop_clusters()


def _stop_clusters() -> None:
    while _CLUSTERS:
        import ray

        ray.shutdown()
        _CLUSTERS.pop().shutdown()


def pytest_runtest_teardown(item, nextitem):
    # A session fixture would keep both nodes up for the rest of the suite: stop them after the last Ray test.
    if _CLUSTERS and (nextitem is None or Path(str(nextitem.fspath)).parent != HERE):
        _stop_clusters()


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory):
    """The whole pipeline on the small config under the local engine (a finished run folder)."""
    root = tmp_path_factory.mktemp("ray-reference")
    config = write_config(root)
    run_pipeline(config, root / "run")
    return config, root / "run"
