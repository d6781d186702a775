"""Autoscaling with nodes that come and go: Ray's fake multi-node autoscaler on this
machine. The pool's replica needs a worker node (a custom resource only worker
nodes have): at start the Ray autoscaler adds one for it (the supervisor asks through
request_resources); idle, the replica goes, then the node; the next request cold-starts
a replica, for which a node comes back."""

from __future__ import annotations


import httpx
import pytest
from conftest import wait_for

ray = pytest.importorskip("ray")


def alive_workers():
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("pool_node")]


# Ray's fake multi-node provider config (its example.yaml, which the wheel does not ship).
FAKE_BASE = {
    "cluster_name": "fake_multinode", "max_workers": 8, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "docker": {}, "auth": {"ssh_user": "ubuntu"}, "file_mounts": {},
    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [],
}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import copy

    from ray.cluster_utils import AutoscalingCluster

    class FakeCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            cfg = copy.deepcopy(FAKE_BASE)
            cfg["available_node_types"] = dict(worker_node_types)
            cfg["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {},
                                                               "max_workers": 0}
            cfg.update(config_kwargs)
            return cfg

    cluster = FakeCluster(
        head_resources={"CPU": 4},
        worker_node_types={"pool_worker": {"resources": {"CPU": 2, "pool_node": 2}, "node_config": {},
                                           "min_workers": 0, "max_workers": 1}},
        idle_timeout_minutes=0.1)
    cluster.start()
    ray.init("auto", logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_nodes_come_and_go_with_the_pool(autoscaling_cluster, llama_dir, tmp_path):
    from conftest import free_port
    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, PoolSpec

    assert not alive_workers()
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), num_kv_blocks=128, device="cpu",
        db=str(tmp_path / "ledger.db"), interval_s=0.25, scale_down_idle_s=2.0, cold_start_timeout_s=120.0,
        autoscaler=True, pools=(PoolSpec("mixed", 1, min_replicas=0, max_replicas=1, resources={"pool_node": 1}),)))
    try:
        assert len(alive_workers()) == 1  # added for the replica
        r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200
        wait_for(lambda: dep.status()[0]["state"] == "stopped", 30, "scaling to zero")
        wait_for(lambda: not alive_workers(), 90, "the idle node's removal")
        r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": "cold", "max_tokens": 3},
                       timeout=150)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert len(alive_workers()) == 1  # a node came back for it
    finally:
        dep.shutdown()
