"""Autoscaling: the policy alone (plain Python), then a deployment whose pool grows
under queued load, shrinks to zero when idle, and cold-starts for the next request;
and on Ray's fake multi-node autoscaler, where the replica's node comes and goes."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import httpx
import pytest
from conftest import wait_for

from ziggurat.cluster.autoscale import AutoscalingConfig, PoolState, decide

ray = pytest.importorskip("ray")


def st(replica, waiting=0, running=0, kv=0.1):
    return SimpleNamespace(replica=replica, num_waiting=waiting, num_running=running, kv_usage=kv, num_receiving=0,
                           num_sending=0)


def test_policy_up_on_sustained_pressure_down_when_idle_and_cold_start_on_demand():
    cfg = AutoscalingConfig(scale_up_queue=2, scale_up_delay_s=1.0, scale_down_idle_s=5.0)
    s = PoolState()
    busy = [st(0, waiting=5, running=2)]
    assert decide(cfg, s, 0.0, busy, 0, 1, 0, 3, False) == ("hold", None)  # pressure must last
    assert decide(cfg, s, 1.5, busy, 0, 1, 0, 3, False) == ("up", None)
    assert decide(cfg, s, 2.0, busy, 1, 2, 0, 3, False) == ("hold", None)  # one starting: wait for it
    assert decide(cfg, s, 2.0, [st(0, kv=0.95)], 0, 1, 0, 1, False) == ("hold", None)  # at max_replicas
    idle = [st(0), st(1)]
    assert decide(cfg, s, 10.0, idle, 0, 2, 0, 3, False) == ("hold", None)
    assert decide(cfg, s, 15.5, idle, 0, 2, 0, 3, False) == ("down", 1)  # the highest slot first
    assert decide(cfg, s, 15.6, [st(0)], 0, 1, 1, 3, False) == ("hold", None)  # min_replicas 1
    assert decide(cfg, PoolState(), 0.0, [], 0, 0, 0, 3, True) == ("up", None)  # cold start, at once
    assert decide(cfg, PoolState(), 0.0, [], 0, 0, 0, 3, False) == ("hold", None)
    assert decide(cfg, PoolState(), 0.0, [], 0, 0, 1, 3, False) == ("up", None)  # below min


def events(dep, kind):
    return [e for e in ray.get(dep.supervisor.history.remote()) if e.get("event") == kind]


def run_load(dep, n, max_tokens=60):
    async def one(http, i):
        r = await http.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": f"load {i}",
                                                               "max_tokens": max_tokens, "ignore_eos": True})
        return r.status_code

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*[one(http, i) for i in range(n)])

    return asyncio.run(main())


def test_a_pool_scales_up_under_load_down_to_zero_and_cold_starts(ray_cluster, llama_dir, tmp_path):
    from conftest import free_port
    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec, PoolSpec

    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), num_kv_blocks=256, device="cpu",
        db=str(tmp_path / "ledger.db"), max_num_seqs=2, max_waiting=64, interval_s=0.25, scale_up_queue=1.0, scale_up_delay_s=0.5,
        scale_down_idle_s=2.0, cold_start_timeout_s=60.0,
        pools=(PoolSpec("mixed", 1, min_replicas=0, max_replicas=2),)))
    try:
        assert [s["state"] for s in dep.status()] == ["serving", "stopped"]
        codes = run_load(dep, 12, 300)  # 2 running at a time: the queue builds up (and lasts a replica start)
        assert codes == [200] * 12
        assert events(dep, "scaled_up"), ray.get(dep.supervisor.history.remote())
        # Idle: both go, down to zero.
        wait_for(lambda: len(events(dep, "scaled_down")) >= 2, 30, "scaling down to zero")
        wait_for(lambda: all(s["state"] == "stopped" for s in dep.status()), 10, "every slot stopped")
        # The next request waits while a replica starts, then completes.
        t0 = time.monotonic()
        r = httpx.post(dep.url + "/v1/completions", json={"model": "tiny", "prompt": "cold", "max_tokens": 4},
                       timeout=90)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert len(events(dep, "scaled_up")) >= 2
        print(f"cold start served in {time.monotonic() - t0:.1f} s")
    finally:
        dep.shutdown()
