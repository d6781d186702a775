"""KV events: the block pool's record of what it caches and evicts, the loop's
coalesced KVEvents (a snapshot first, numbered per incarnation), and the
router's exact index mirroring a replica's cache through them, gaps included."""

from __future__ import annotations

import random

from ziggurat.actors.router.kv_index import KVIndex
from ziggurat.actors.scheduler.block_pool import ROOT_HASH, BlockPool, hash_block_tokens, prompt_block_hashes
from ziggurat.actors.scheduler.loop import SchedulerLoop
from ziggurat.actors.scheduler.messages import KVEvents, SubmitRequest
from ziggurat.sampling_params import SamplingParams
from ziggurat.scripts.bench_routing import SimConfig, make_engines


def _cache(pool, blocks, tokens):
    parent, ph = None, ROOT_HASH
    for b, t in zip(blocks, tokens):
        h = hash_block_tokens(ph, t)
        parent = pool.cache_full_block(b, h, ph, t, (), parent)
        ph = h
    return ph


def test_pool_records_stored_and_evicted_hashes_coalesced_and_bounded():
    pool = BlockPool(4)
    pool.record_events()
    blocks = pool.get_new_blocks(2)
    _cache(pool, blocks, [(1, 2), (3, 4)])
    stored, removed, over = pool.take_events()
    assert stored == prompt_block_hashes([1, 2, 3, 4], 2) and removed == [] and not over
    pool.free_blocks(reversed(blocks))
    pool.get_new_blocks(4)  # evicts both (tail first)
    stored, removed, over = pool.take_events()
    assert stored == [] and sorted(removed) == sorted(prompt_block_hashes([1, 2, 3, 4], 2))
    assert pool.take_events() == ([], [], False)  # nothing since
    # Bounded: past max_events pending hashes, they are dropped and a snapshot is flagged.
    pool = BlockPool(64)
    pool.record_events()
    pool.max_events = 5
    blocks = pool.get_new_blocks(8)
    for i, b in enumerate(blocks):
        pool.cache_full_block(b, bytes([i]) * 32, ROOT_HASH, (i,), (), None)
    stored, removed, over = pool.take_events()
    assert over and len(stored) < 8
    assert sorted(pool.cached_hashes()) == sorted(bytes([i]) * 32 for i in range(8))


def test_the_index_mirrors_a_replica_cache_through_its_events_under_eviction(llama_dir):
    """Many prompts through a small cache: the index, fed only KVEvents, ends equal to
    the pool's own map; the first message is a snapshot and seq counts up by one."""
    (engine,) = make_engines(llama_dir, SimConfig(replicas=1, num_blocks=40))
    sent, msgs = [], []
    lp = SchedulerLoop(engine, 0, lambda _i, b: sent.append(b), max_waiting=1000)
    lp.register_ingress("ing", "e")
    lp.publish_kv_events(msgs.append, interval_s=0.0)
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 999) for _ in range(64)] for _ in range(6)]
    index = KVIndex()
    for i in range(30):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 999) for _ in range(rng.randint(1, 40))]
        lp.submit(SubmitRequest(f"r{i}", prompt, SamplingParams(max_tokens=4, ignore_eos=True), "ing"))
        for _ in range(8):
            lp.run_once(idle_timeout=0.0)
        for m in msgs:
            assert not index.apply(m)  # in order: never a snapshot request
        msgs.clear()
    while engine.has_unfinished():
        lp.run_once(idle_timeout=0.0)
    lp.run_once(idle_timeout=0.0)
    for m in msgs:
        index.apply(m)
    assert index.snapshots == 1 and index.gaps == 0
    assert index.held[0] == set(engine.kv.cached_hashes()) and len(index.held[0]) > 0
    assert sum(1 for _ in engine.kv.pool.blocks) == 40  # the cache did evict: far more blocks were cached
    assert index.next_seq[0] > 10


def test_a_gap_asks_for_a_snapshot_which_replaces_the_entries():
    t = [0.0]
    idx = KVIndex(clock=lambda: t[0])
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert not idx.apply(KVEvents(0, "e1", 0, [a, b], [], snapshot=True))
    assert not idx.apply(KVEvents(0, "e1", 1, [c], [a]))
    assert idx.held[0] == {b, c} and idx.mask(b) == 1
    assert idx.apply(KVEvents(0, "e1", 3, [a], []))  # seq 2 was lost
    assert not idx.apply(KVEvents(0, "e1", 4, [], []))  # asked already: not again at once
    t[0] += 2.0
    assert idx.apply(KVEvents(0, "e1", 5, [], []))  # still no snapshot after RESYNC_S: ask again
    assert not idx.apply(KVEvents(0, "e1", 6, [b], [], snapshot=True))
    assert idx.held[0] == {b} and idx.mask(a) == 0 and idx.mask(c) == 0
    assert not idx.apply(KVEvents(0, "e1", 7, [a], []))  # in order again
    # A rebuilt replica (new epoch) starts from nothing; a router that knows nothing asks.
    assert not idx.apply(KVEvents(0, "e2", 0, [], [], snapshot=True))
    assert idx.held[0] == set() and idx.holders == {}
    fresh = KVIndex()
    assert fresh.apply(KVEvents(1, "e9", 41, [a], []))
    assert fresh.mask(a) == 2  # applied anyway meanwhile


def test_a_new_router_learns_an_idle_replicas_cache_from_its_report(llama_dir):
    """An idle replica sends no KV events, so a router that starts after it went idle
    never sees a gap; its report is answered "send a snapshot" (once per RESYNC_S),
    the loop sends one while idle, and the new router's index equals the cache."""
    from ziggurat.actors.router.policy import Router

    (engine,) = make_engines(llama_dir, SimConfig(replicas=1, num_blocks=40))
    msgs = []
    lp = SchedulerLoop(engine, 0, lambda _i, b: None, max_waiting=10)
    lp.register_ingress("ing", "e")
    lp.publish_kv_events(msgs.append, interval_s=0.0)
    prompt = [(i * 13) % 900 + 1 for i in range(100)]
    lp.submit(SubmitRequest("r0", prompt, SamplingParams(max_tokens=2, ignore_eos=True), "ing"))
    while engine.has_unfinished():
        lp.run_once(idle_timeout=0.0)
    lp.run_once(idle_timeout=0.0)
    lp.run_once(idle_timeout=0.0)
    old = Router(1, block_size=16)
    for m in msgs:
        old.kv_events(m)
    assert old.kv.num_blocks(0) == 6  # 100 prompt tokens + 1 computed output: 6 full blocks
    msgs.clear()
    for _ in range(3):  # idle: nothing changes, nothing is sent
        lp.run_once(idle_timeout=0.0)
    assert msgs == []
    t = [0.0]
    new = Router(1, block_size=16, clock=lambda: t[0])
    assert new.report(lp.stats())  # it mirrors nothing of replica 0: ask
    assert not new.report(lp.stats())  # asked already: not again at once
    assert not old.report(lp.stats())  # in sync: never asks
    lp.request_kv_snapshot()
    lp.run_once(idle_timeout=0.0)
    assert len(msgs) == 1 and msgs[0].snapshot
    assert not new.kv_events(msgs[0]) and not new.report(lp.stats())
    assert new.kv.held[0] == set(engine.kv.cached_hashes()) == old.kv.held[0]
    prefix = prompt_block_hashes(prompt, 16)
    assert new.route(prefix, len(prompt)).replica == 0 and new.last.matches[0] == 6
