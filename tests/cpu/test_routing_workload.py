"""Issue 15's routing acceptance on CPU: 4 replicas whose caches each hold about a
quarter to a third of the workload's distinct reused prefix blocks, 16 groups x 8
prompts on a ~600-token system prompt plus 16 four-turn chats, interleaved,
concurrency 4, through the real Router fed real KVEvents and ReplicaStats from
real engines (scheduler, KV manager, block pool with real eviction; no forward
pass: scripts/bench_routing.py's NoModelExecutor), in simulated time. The
end-to-end path through real model engines is test_routing_e2e.py."""

from __future__ import annotations

import dataclasses

import pytest

from ziggurat.actors.scheduler.block_pool import prompt_block_hashes
from ziggurat.scripts.bench_routing import SimConfig, Workload, make_engines, simulate

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs(llama_dir):
    cfg = SimConfig()
    engines = make_engines(llama_dir, cfg)
    out = {(p, s): simulate(engines, Workload(seed=s), p, cfg) for s in SEEDS
           for p in ("kv-aware", "oracle", "round-robin")}
    restart = dataclasses.replace(cfg, restart_at=0.5)
    out.update({("restart", s): simulate(engines, Workload(seed=s), "kv-aware", restart) for s in SEEDS})
    return out


def test_the_caches_hold_a_quarter_to_a_third_of_the_reused_prefixes():
    w = Workload(seed=0)
    group_blocks = sum(len(prompt_block_hashes(s, w.block_size)) for s in w.group_system)
    chat_blocks = w.chats * (w.turns * 44 + (w.turns - 1) * w.max_tokens) // w.block_size + w.chat_system_blocks
    share = SimConfig().num_blocks / (group_blocks + chat_blocks)
    assert 0.25 <= share <= 0.34, share


def test_kv_aware_against_the_oracle_round_robin_and_balance(runs):
    pct = [runs["kv-aware", s].hit_rate / runs["oracle", s].hit_rate for s in SEEDS]
    assert sum(pct) / len(pct) >= 0.95 and min(pct) >= 0.92, pct
    kv_mean = sum(runs["kv-aware", s].hit_rate for s in SEEDS) / len(SEEDS)
    rr_mean = sum(runs["round-robin", s].hit_rate for s in SEEDS) / len(SEEDS)
    assert kv_mean >= 3.0 * rr_mean, (kv_mean, rr_mean)  # over the 3 runs (seed 0 alone: 2.94x)
    for s in SEEDS:
        kv = runs["kv-aware", s]
        assert kv.imbalance <= 1.5, (s, kv.per_replica)
        assert sum(kv.per_replica) == Workload().num_requests


def test_conversations_stay_put_unless_load_moves_them(runs):
    for s in SEEDS:
        kv = runs["kv-aware", s]
        # Every move is a load override (a replica held a longer prefix; its cost was higher), and few.
        assert kv.moves == kv.load_moves and kv.moves <= 3, (s, kv.moves, kv.load_moves)
        assert runs["oracle", s].moves == 0


def test_a_router_restart_mid_run_keeps_the_hit_rate_within_5_points(runs):
    for s in SEEDS:
        r = runs["restart", s]
        assert r.restarted and r.snapshots == 4  # rebuilt from every replica's snapshot
        assert abs(r.hit_rate - runs["kv-aware", s].hit_rate) <= 0.05, (s, r.hit_rate)


def test_the_http_driver_runs_the_workload_and_reads_usage_and_per_replica_load(llama_dir):
    """scripts/bench_routing.py's --url path (drive_http) on a small workload against two
    in-process replicas behind the HTTP app: every request answered, cached tokens from
    the streams' usage, per-replica load from /metrics, chats carrying the model's answers
    (return_token_ids), and the hit rate within reach of the simulated oracle."""
    import asyncio

    import httpx

    from ziggurat.actors.ingress.gatekeeper import Gatekeeper
    from ziggurat.actors.ingress.local_engine import LocalEngineClient
    from ziggurat.actors.ingress.server import IngressConfig, OpenAIServer
    from ziggurat.actors.scheduler.engine import EngineCore
    from ziggurat.config import EngineConfig
    from ziggurat.scripts.bench_routing import drive_http, replica_requests

    kw = dict(groups=4, per_group=3, chats=2, turns=3, system_tokens=160)
    w = Workload(seed=3, **kw)
    cfg = EngineConfig(model=str(llama_dir), device="cpu", dtype="float32", num_kv_blocks=96, block_size=16)
    engines = [EngineCore(cfg), EngineCore(cfg)]
    client = LocalEngineClient(engines)
    server = OpenAIServer(IngressConfig(served_model_name="tiny"), client, Gatekeeper(None), client.info)
    client.start()

    async def main():
        client.bind(asyncio.get_running_loop())
        return await drive_http("http://t", w, "kv-aware", 2, transport=httpx.ASGITransport(app=server.asgi))

    try:
        res = asyncio.run(main())
    finally:
        client.stop()
        for e in engines:
            e.shutdown()
    assert sum(res.per_replica) == w.num_requests == len(res.ttft) == 18 and len(res.per_replica) == 2
    assert min(res.per_replica) > 0
    assert res.kind_tokens["group"][0] + res.kind_tokens["chat"][0] == res.prompt_tokens
    sim = SimConfig(replicas=2, num_blocks=96, concurrency=2)
    oracle = simulate(make_engines(llama_dir, sim), Workload(seed=3, **kw), "oracle", sim)
    assert oracle.prompt_tokens == res.prompt_tokens  # the same prompts, in whatever order
    assert res.hit_rate > 0.4 and 0.85 <= res.hit_rate / oracle.hit_rate <= 1.1, (res.hit_rate, oracle.hit_rate)
    text = 'ziggurat_request_success_total{model_name="m",replica="1",finished_reason="length"} 7\n' \
           'ziggurat_request_success_total{model_name="m",replica="1",finished_reason="stop"} 2\n# x\n'
    assert replica_requests(text) == {1: 9.0}


def test_seeded_answers_fix_a_chats_history_by_seed_chat_and_turn():
    w = Workload(seed=0, answers="seeded")
    a = w.history_after(("chat", 2, 1), [5, 6], [9, 9, 9])
    assert a[:2] == [5, 6] and len(a) == 2 + w.max_tokens and a == w.history_after(("chat", 2, 1), [5, 6], [])
    assert a != w.history_after(("chat", 2, 2), [5, 6], [])
    assert Workload(seed=0).history_after(("chat", 2, 1), [5, 6], [9]) == [5, 6, 9]  # the model's answer


def test_balance_holds_at_http_like_timing(llama_dir):
    """The deployment's timing on this CPU (a 40 ms step, 20 ms from the router's pick to the
    replica's inbox, messages 5 ms late) with the HTTP driver's seeded answers: seed 2 put
    64 requests on one replica and 35 on another (1.83x) before picks the replicas had not
    yet counted were kept and new prefixes were placed by traffic share."""
    cfg = SimConfig(step_s=0.04, submit_lag_s=0.02, lag_s=0.005)
    engines = make_engines(llama_dir, cfg)
    w = lambda: Workload(seed=2, answers="seeded")  # noqa: E731
    kv, oracle = simulate(engines, w(), "kv-aware", cfg), simulate(engines, w(), "oracle", cfg)
    for e in engines:
        e.shutdown()
    assert kv.imbalance <= 1.5, kv.per_replica
    assert kv.hit_rate >= 0.95 * oracle.hit_rate, (kv.hit_rate, oracle.hit_rate)
