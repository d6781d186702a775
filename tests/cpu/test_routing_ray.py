"""The router in a real Ray deployment on CPU: 2 replicas of the tiny model, 2
router actors fed alike by both schedulers. A repeated long prefix is a cache hit
through either router; one router killed mid-run (Ray restarts it) costs no
request: the ingress falls over to the other router, and the restarted one
rebuilds its index from both replicas' snapshots (the idle one included: it is
asked on its next report)."""

from __future__ import annotations

import asyncio
import time

import pytest

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")

from conftest import free_port, wait_for  # noqa: E402

from ziggurat.cluster.deploy import Deployment  # noqa: E402
from ziggurat.cluster.spec import DeploymentSpec  # noqa: E402

PREFIX = [(i * 37) % 900 + 5 for i in range(320)]  # 20 blocks of 16


def stats(router) -> dict:
    return ray.get(router.routing_stats.remote(), timeout=10)


def test_two_routers_share_one_view_and_survive_a_router_kill(ray_cluster, llama_dir, tmp_path):
    t0 = time.monotonic()
    dep = Deployment(DeploymentSpec.from_flat(
        model=str(llama_dir), served_model_name="tiny", port=free_port(), num_kv_blocks=128, device="cpu",
        db=str(tmp_path / "ledger.db"), replicas=2, routers=2, interval_s=0.25))
    try:
        async def one(http, k):
            body = {"model": "tiny", "prompt": PREFIX + [k % 800 + 1] * 8, "max_tokens": 2, "temperature": 0}
            r = await http.post(dep.url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        async def run(ks, kill_after=None):
            async with httpx.AsyncClient(timeout=60) as http:
                out = []
                for k in ks:
                    out.append(await one(http, k))
                    if k == kill_after:  # mid-run: the next request's router may be the dead one
                        ray.kill(dep.routers[0], no_restart=False)
                    await asyncio.sleep(0.05)  # the KV events of this one reach both routers
                return out

        before = asyncio.run(run(range(6)))
        assert before[0] == 0 and all(c == 320 for c in before[1:]), before
        a, b = stats(dep.routers[0]), stats(dep.routers[1])
        assert a["picks"] == b["picks"] == 3  # the ingress takes them in turn
        assert a["hit_blocks"] > 0 and b["hit_blocks"] > 0  # each router saw the other's prefix
        assert a["cached_blocks"] == b["cached_blocks"]  # one view
        during = asyncio.run(run(range(6, 18), kill_after=7))
        assert len(during) == 12  # every request succeeded
        # The router killed after request 7 answered nothing until restarted: the other routed
        # meanwhile, so every request still found the prefix cached.
        assert all(c == 320 for c in during), during
        wait_for(lambda: stats(dep.routers[0])["snapshots"] >= 2, 20, "the restarted router's snapshots")
        s, other = stats(dep.routers[0]), stats(dep.routers[1])
        # A new incarnation (counters afresh) that routed its turns with the rebuilt index: each
        # of its picks held the whole prefix. Replica 0 served nothing (it is idle throughout):
        # its snapshot came from the answer to its report, not from a gap.
        assert 1 <= s["picks"] < 12 and s["hit_blocks"] == 20 * s["picks"], s
        assert s["picks"] + other["picks"] - b["picks"] >= 11, (s, other)  # at most one lost with the kill
        assert s["routed"][0] == 0 and s["cached_blocks"] == other["cached_blocks"] == [0, 20], (s, other)
        after = asyncio.run(run(range(18, 22)))
        assert all(c == 320 for c in after), after  # through both routers again
        assert stats(dep.routers[0])["hit_blocks"] >= 2 * 20
    finally:
        dep.shutdown()
    assert time.monotonic() - t0 < 90
