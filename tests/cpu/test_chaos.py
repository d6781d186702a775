"""The chaos harness (scripts/chaos.py) with one kill of each kind, bounded.

Streaming load from 3 tenants on a 2-replica CPU deployment while, in turn, a
worker, a scheduler, the router, the meter and an ingress are killed: every
request ends (success or a clean error), the deployment serves again within
30 s of each kill with every replica rebuilt, the usage billed for each
request equals the tokens its client received, nothing is lost, and every KV
block is free afterwards. (10 kills of each kind: `python -m
ziggurat.scripts.chaos --kills 10`, figures in BENCHMARKS.md.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("httpx")
ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_kills_of_every_kind_under_load(llama_dir):
    from ziggurat.scripts import chaos

    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        r = chaos.run(["worker", "scheduler", "router", "meter", "ingress"], kills=1, concurrency=6,
                      model=str(llama_dir), gap_s=1.5)
    finally:
        ray.shutdown()
    assert r.requests > 50 and r.ok > 0
    assert r.unfinished == 0
    assert all(serving <= 30 and rebuilt <= 30 for _, serving, rebuilt in r.kills), r.kills
    assert r.billing_mismatches == [], r.billing_mismatches[:10]
    assert r.lost == 0 and r.leaked_blocks == 0
    kinds = [e["event"] for e in r.supervisor]
    assert kinds.count("rebuilt") >= 2 and "gave_up" not in kinds  # the worker's and the scheduler's replicas
