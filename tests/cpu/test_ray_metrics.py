"""The same metrics, names and values on the ingress's /metrics and on Ray's metrics
agent (which adds its `ray_` prefix): counters, gauges and histograms."""

from __future__ import annotations

import re
import time

import httpx
import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_with_fast_metrics():
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR",
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray._private.worker.global_worker.node.metrics_export_port
    ray.shutdown()


def series(text: str, prefix: str, name: str, **labels) -> float | None:
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"{prefix}{name}\{{([^}}]*)\}} ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total, found = total + float(m.group(2)), True
    return total if found else None


def test_ingress_and_ray_export_the_same_names_and_values(ray_with_fast_metrics, llama_dir, tmp_path):
    from conftest import free_port
    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec

    port = ray_with_fast_metrics
    dep = Deployment(DeploymentSpec.from_flat(model=str(llama_dir), served_model_name="tiny", port=free_port(),
                                              num_kv_blocks=128, device="cpu", db=str(tmp_path / "l.db")))
    try:
        for i in range(3):
            r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": f"p{i}", "max_tokens": 4},
                           timeout=60)
            assert r.status_code == 200
        checks = [("request_success_total", {"finished_reason": "length"}),
                  ("time_to_first_token_seconds_count", {}), ("e2e_request_latency_seconds_count", {}),
                  ("request_generation_tokens_bucket", {"le": "5.0"}), ("generation_tokens_total", {}),
                  ("kv_total_blocks", {})]
        ours = httpx.get(dep.url + "/metrics").text
        want = {name: series(ours, "ziggurat_", name, model_name="tiny", **lab) for name, lab in checks}
        assert want["request_success_total"] == 3 and want["time_to_first_token_seconds_count"] == 3
        assert want["generation_tokens_total"] == 12 and want["kv_total_blocks"] == 128
        deadline, got = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            theirs = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            got = {name: series(theirs, "ray_ziggurat_", name, model_name="tiny", **lab) for name, lab in checks}
            if got == want:
                break
            time.sleep(1)
        assert got == want
    finally:
        dep.shutdown()
