"""Block pool / KV cache manager: exact block ids and exact free-queue order."""

import hashlib
import os
import subprocess
import sys

import pytest

from ziggurat.actors.scheduler.block_pool import ROOT_HASH, BlockPool, hash_block_tokens
from ziggurat.actors.scheduler.kv_manager import KVCacheManager

BS = 4


def toks(*blocks, tail=()):
    """Prompt from per-block fill values: toks(1, 2, tail=[9]) -> [1]*4 + [2]*4 + [9]."""
    out = []
    for v in blocks:
        out += [v] * BS
    return out + list(tail)


def chain(token_ids, extra=()):
    hs, h = [], ROOT_HASH
    for i in range(len(token_ids) // BS):
        h = hash_block_tokens(h, tuple(token_ids[i * BS:(i + 1) * BS]), extra)
        hs.append(h)
    return hs


def prefill(kv, rid, token_ids, extra=()):
    """What the scheduler does for a waiting request."""
    hit_ids, n = kv.get_computed_blocks(rid, token_ids, extra)
    return kv.allocate_slots(rid, token_ids, n, len(token_ids) - n, hit_ids, extra), n


def refs(kv, ids):
    return [kv.pool.blocks[i].ref_cnt for i in ids]


# ---- hashing -----------------------------------------------------------------

def test_hash_is_chained_stable_and_keyed():
    h0 = hash_block_tokens(ROOT_HASH, (1, 2, 3, 4), ())
    assert len(h0) == 32 and h0 == hash_block_tokens(b"", [1, 2, 3, 4], ())
    assert hash_block_tokens(h0, (5,), ()) != hash_block_tokens(ROOT_HASH, (5,), ())
    assert h0 != hash_block_tokens(ROOT_HASH, (1, 2, 3, 4), (0,))
    assert hash_block_tokens(ROOT_HASH, (1,), ("a",)) != hash_block_tokens(ROOT_HASH, (1,), ("b",))
    assert hash_block_tokens(ROOT_HASH, (1,), (1,)) != hash_block_tokens(ROOT_HASH, (1,), ("1",))
    # Same value in another interpreter with another hash seed (not Python's hash()).
    code = ("from ziggurat.actors.scheduler.block_pool import hash_block_tokens as h;"
            "print(h(b'', (1, 2, 3, 4), (7, 'salt')).hex())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == hash_block_tokens(b"", (1, 2, 3, 4), (7, "salt")).hex()


def test_free_queue_middle_removal():
    pool = BlockPool(5)
    assert pool.free_queue_ids() == [0, 1, 2, 3, 4]
    b2 = pool.blocks[2]
    pool.touch([b2])
    assert pool.free_queue_ids() == [0, 1, 3, 4] and b2.ref_cnt == 1
    assert [b.block_id for b in pool.get_new_blocks(2)] == [0, 1]
    pool.free_blocks([pool.blocks[1], b2])
    assert pool.free_queue_ids() == [3, 4, 1, 2] and pool.num_free_blocks == 4
    with pytest.raises(ValueError):
        pool.get_new_blocks(5)


# ---- allocation --------------------------------------------------------------

def test_fresh_allocation_ids():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    assert kv.pool.free_queue_ids() == list(range(10)) and kv.usage == 0.0
    assert prefill(kv, "a", list(range(10))) == ([0, 1, 2], 0)
    assert prefill(kv, "b", list(range(100, 104))) == ([3], 0)
    assert kv.get_block_ids("a") == [0, 1, 2] and kv.get_block_ids("b") == [3]
    assert kv.num_free_blocks == 6 and kv.usage == pytest.approx(0.4)
    assert kv.pool.free_queue_ids() == [4, 5, 6, 7, 8, 9]
    assert kv.get_block_ids("nope") == []


def test_growth_across_steps():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    t = list(range(8))
    assert prefill(kv, "a", t) == ([0, 1], 0)
    t.append(100)  # decode: token 8 crosses into a third block
    assert kv.allocate_slots("a", t, 8, 1) == [2]
    t.append(101)
    assert kv.allocate_slots("a", t, 9, 1) == []
    assert kv.get_block_ids("a") == [0, 1, 2] and kv.num_free_blocks == 7
    # Chunked prefill: 6 of 14 tokens, then the other 8.
    u = list(range(200, 214))
    assert kv.allocate_slots("b", u, 0, 6) == [3, 4]
    assert kv.allocate_slots("b", u, 6, 8) == [5, 6]
    assert kv.get_block_ids("b") == [3, 4, 5, 6]


def test_free_order_reverse_to_tail():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prefill(kv, "a", list(range(10)))  # [0, 1, 2]
    prefill(kv, "b", list(range(20, 28)))  # [3, 4]
    kv.free("a")
    assert kv.pool.free_queue_ids() == [5, 6, 7, 8, 9, 2, 1, 0]
    kv.free("b")
    assert kv.pool.free_queue_ids() == [5, 6, 7, 8, 9, 2, 1, 0, 4, 3]
    assert kv.num_free_blocks == 10 and kv.get_block_ids("a") == []
    kv.free("a")  # unknown now: no-op
    assert kv.num_free_blocks == 10


# ---- prefix caching ----------------------------------------------------------

def test_prefix_hit_same_prompt():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    p = toks(1, 2, tail=[3, 3])
    assert prefill(kv, "a", p) == ([0, 1, 2], 0)
    assert kv.num_cached_blocks() == 2  # only full blocks
    assert kv.get_computed_blocks("b", p) == ([0, 1], 8)
    assert kv.allocate_slots("b", p, 8, 2, [0, 1]) == [0, 1, 3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert refs(kv, [0, 1, 2, 3]) == [2, 2, 1, 1]
    assert kv.num_free_blocks == 6 and kv.pool.free_queue_ids() == [4, 5, 6, 7, 8, 9]
    kv.free("a")
    assert refs(kv, [0, 1, 2]) == [1, 1, 0]
    assert kv.pool.free_queue_ids() == [4, 5, 6, 7, 8, 9, 2]
    kv.free("b")
    assert kv.pool.free_queue_ids() == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]


def test_partial_blocks_only_full_ones_hit():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    assert prefill(kv, "a", toks(1, tail=[2, 2])) == ([0, 1], 0)  # 6 tokens
    assert kv.num_cached_blocks() == 1
    # Shares all 6 tokens plus one more: only block 0 is full in "a", so only it hits.
    assert kv.get_computed_blocks("b", toks(1, tail=[2, 2, 2])) == ([0], 4)
    # Shares block 0, differs in block 1.
    assert kv.get_computed_blocks("c", toks(1, 5)) == ([0], 4)
    # Differs in block 0.
    assert kv.get_computed_blocks("d", toks(5, tail=[2, 2])) == ([], 0)
    for r in "bcd":
        kv.free(r)


def test_whole_prompt_cached_leaves_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    p = toks(1, 2)
    assert prefill(kv, "a", p) == ([0, 1], 0)
    assert kv.num_cached_blocks() == 2
    assert kv.get_computed_blocks("b", p) == ([0], 4)  # last block dropped
    assert kv.allocate_slots("b", p, 4, 4, [0]) == [0, 2]
    assert kv.get_computed_blocks("c", p[:4]) == ([], 0)
    assert kv.get_computed_blocks("d", p + [9]) == ([0, 1], 8)
    assert kv.get_computed_blocks("e", []) == ([], 0)
    for r in "bcde":
        kv.free(r)


def test_decoded_tokens_are_cached():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    t = toks(1, tail=[2, 2, 2])
    prefill(kv, "a", t)  # [0, 1]; block 1 holds 3 prompt tokens
    assert kv.num_cached_blocks() == 1
    t.append(2)  # the 8th token is computed this step: block 1 becomes full
    assert kv.allocate_slots("a", t, 7, 1) == []
    assert kv.num_cached_blocks() == 2
    assert kv.get_computed_blocks("b", t + [5]) == ([0, 1], 8)
    kv.free("b")


def test_eviction_lru():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    p = toks(1, 2, 3, 4)
    hs = chain(p)
    assert prefill(kv, "a", p) == ([0, 1, 2, 3], 0)
    assert kv.num_cached_blocks() == 4 and kv.num_free_blocks == 0
    kv.free("a")
    assert kv.pool.free_queue_ids() == [3, 2, 1, 0]
    assert kv.num_free_blocks == 4 and kv.usage == 0.0  # cached-but-free counts as free
    assert prefill(kv, "b", toks(9, tail=[9])) == ([3, 2], 0)  # the LRU head is evicted
    assert hs[3] not in kv.pool._cached and hs[2] not in kv.pool._cached
    assert kv.pool.blocks[3].block_hash == chain(toks(9))[0]  # now caches b's block
    assert kv.pool.blocks[2].block_hash is None  # b's partial block
    assert kv.num_cached_blocks() == 3
    assert kv.pool.free_queue_ids() == [1, 0]
    # The evicted tail no longer hits; the surviving prefix still does.
    assert kv.get_computed_blocks("c", p + [5]) == ([0, 1], 8)
    kv.free("c")


def test_hit_revives_block_from_middle_of_free_queue():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    pa, pb = toks(1, 2), toks(3, 4)
    prefill(kv, "a", pa)  # [0, 1]
    prefill(kv, "b", pb)  # [2, 3]
    kv.free("a")
    kv.free("b")
    assert kv.pool.free_queue_ids() == [4, 5, 1, 0, 3, 2]
    assert kv.get_computed_blocks("c", pa + [7]) == ([0, 1], 8)
    assert kv.pool.free_queue_ids() == [4, 5, 1, 0, 3, 2]  # looking takes nothing
    assert kv.allocate_slots("c", pa + [7], 8, 1, [0, 1]) == [0, 1, 4]
    assert kv.pool.free_queue_ids() == [5, 3, 2]
    assert refs(kv, [0, 1, 4]) == [1, 1, 1] and kv.num_free_blocks == 3
    kv.free("c")
    assert kv.pool.free_queue_ids() == [5, 3, 2, 4, 1, 0]


def test_extra_keys_isolate():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    p = toks(1, 2, tail=[3])
    assert prefill(kv, "a", p, extra=(1, "salt-a")) == ([0, 1, 2], 0)
    assert kv.get_computed_blocks("b", p, (1, "salt-b")) == ([], 0)
    assert kv.get_computed_blocks("c", p, (2, "salt-a")) == ([], 0)
    assert kv.get_computed_blocks("d", p) == ([], 0)
    assert kv.get_computed_blocks("e", p, (1, "salt-a")) == ([0, 1], 8)
    # A request's extra keys are fixed for its lifetime.
    with pytest.raises(ValueError):
        kv.allocate_slots("e", p, 8, 1, [0, 1])
    assert kv.allocate_slots("e", p, 8, 1, [0, 1], (1, "salt-a")) == [0, 1, 3]
    for r in "abcde":
        kv.free(r)


# ---- collision safety -------------------------------------------------------

@pytest.mark.parametrize("const", [b"same", ROOT_HASH])
def test_forced_collision_never_returns_wrong_tokens(const):
    kv = KVCacheManager(num_blocks=12, block_size=BS, hash_fn=lambda parent, t, extra: const)
    p = toks(1, 2, tail=[9])
    assert prefill(kv, "a", p) == ([0, 1, 2], 0)
    assert kv.num_cached_blocks() == 1  # block 1 collides with block 0: not cached
    assert kv.get_computed_blocks("b", toks(5, 2, tail=[9])) == ([], 0)
    assert kv.get_computed_blocks("c", toks(1, 5, tail=[9])) == ([0], 4)
    assert kv.get_computed_blocks("d", p) == ([0], 4)
    # A run of identical blocks must not hit block 0 again at position 1.
    assert kv.get_computed_blocks("e", toks(1, 1, 1, tail=[9])) == ([0], 4)
    for r in "bcde":
        kv.free(r)
    # Results stay correct end to end: the second request shares only block 0.
    assert prefill(kv, "f", toks(1, 1, tail=[9])) == ([0, 3, 4], 4)
    assert refs(kv, [0, 1, 2, 3, 4]) == [2, 1, 1, 1, 1]


def test_collision_with_evicted_parent_is_not_a_hit():
    """A hash that ignores the parent and only sums the tokens: a cached child
    whose parent was evicted and whose parent *hash* is reused by a block with
    other tokens must not be returned (comparing parent hashes alone would)."""
    def weak(parent, t, extra):
        return hashlib.sha256(str(sum(t)).encode()).digest()

    kv = KVCacheManager(num_blocks=6, block_size=BS, hash_fn=weak)
    # r1 and r2 are looked up before either is allocated (both miss), so r2's
    # block 0 duplicates r1's block 0 and r2's block 1 is cached under block 0.
    p1, p2 = toks(1, tail=[9]), toks(1, 5, tail=[0])
    assert kv.get_computed_blocks("r1", p1) == kv.get_computed_blocks("r2", p2) == ([], 0)
    assert kv.allocate_slots("r1", p1, 0, len(p1)) == [0, 1]
    assert kv.allocate_slots("r2", p2, 0, len(p2)) == [2, 3, 4]
    assert kv.pool.blocks[2].block_hash is None  # duplicate of block 0
    assert kv.pool.blocks[3].block_hash is not None  # cached under parent block 0
    kv.free("r1")
    assert kv.pool.free_queue_ids() == [5, 1, 0]
    assert prefill(kv, "r3", [7] * 9) == ([5, 1, 0], 0)  # evicts block 0
    kv.free("r3")
    # [2,2,0,0] sums like [1,1,1,1]: it takes block 0's old hash.
    assert kv.pool.free_queue_ids() == [0, 1, 5]
    assert prefill(kv, "b", [2, 2, 0, 0, 1]) == ([0, 1], 0)
    c = [2, 2, 0, 0, 5, 5, 5, 5, 0]
    # c's block 1 matches r2's block 3 by hash, parent hash and tokens, but
    # block 3 holds KV for [1,1,1,1,5,5,5,5]: only block 0 may hit.
    h0, h1 = weak(None, c[:4], ()), weak(None, c[4:8], ())
    assert kv.pool.blocks[0].block_hash == h0
    assert kv.pool.blocks[3].block_hash == h1 and kv.pool.blocks[3].key == (h0, (5,) * 4, ())
    assert kv.get_computed_blocks("c", c) == ([0], 4)
    # Caching c's real block 1 replaces the unreachable entry (block 3).
    kv.free("b")
    assert kv.pool.free_queue_ids() == [5, 1, 0]
    assert kv.allocate_slots("c", c, 4, 5, [0]) == [0, 5, 1]
    assert kv.pool.blocks[3].block_hash is None and kv.pool.blocks[5].block_hash == h1
    assert kv.get_computed_blocks("d", c) == ([0, 5], 8)


# ---- failure and modes -------------------------------------------------------

def test_allocate_none_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    p = toks(1, 2)
    prefill(kv, "a", p)  # [0, 1]
    kv.free("a")
    assert kv.pool.free_queue_ids() == [2, 3, 1, 0]
    state = lambda: (kv.num_free_blocks, kv.pool.free_queue_ids(), refs(kv, range(4)),
                     kv.num_cached_blocks(), kv.get_block_ids("b"))
    before = state()
    # 17 tokens: 2 hits (both free) + 3 new = 5 > 4 free, net of the hits.
    q = p + [7] * 9
    hit_ids, n = kv.get_computed_blocks("b", q)
    assert (hit_ids, n) == ([0, 1], 8)
    assert kv.allocate_slots("b", q, n, 9, hit_ids) is None
    assert state() == before
    # 16 tokens: 2 hits + 2 new = 4 fits exactly.
    q = p + [7] * 8
    hit_ids, n = kv.get_computed_blocks("b", q)
    assert kv.allocate_slots("b", q, n, 8, hit_ids) == [0, 1, 2, 3]
    assert kv.num_free_blocks == 0 and kv.pool.free_queue_ids() == []
    # A running request that cannot grow: None, table unchanged.
    assert kv.allocate_slots("b", q + [1], 16, 1) is None
    assert kv.get_block_ids("b") == [0, 1, 2, 3] and refs(kv, range(4)) == [1, 1, 1, 1]
    assert prefill(kv, "c", [5]) == (None, 0)
    assert kv.get_block_ids("c") == []
    kv.free("c")


def test_stale_hit_is_rejected():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    p = toks(1, tail=[2])
    prefill(kv, "a", p)  # [0, 1]
    kv.free("a")  # queue [2, 1, 0]
    assert kv.get_computed_blocks("b", p) == ([0], 4)
    prefill(kv, "x", [8] * 12)  # another allocation in between evicts block 0
    with pytest.raises(ValueError):
        kv.allocate_slots("b", p, 4, 1, [0])


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    p = toks(1, 2, tail=[3])
    assert prefill(kv, "a", p) == ([0, 1, 2], 0)
    assert kv.num_cached_blocks() == 0
    assert kv.get_computed_blocks("b", p) == ([], 0)
    assert prefill(kv, "b", p) == ([3, 4, 5], 0)
    kv.free("a")
    assert kv.get_computed_blocks("c", p) == ([], 0)
    assert all(b.block_hash is None for b in kv.pool.blocks)


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    p = toks(1, 2, tail=[3])
    prefill(kv, "a", p)
    assert kv.num_cached_blocks() == 2
    assert kv.reset_prefix_cache() is False  # block in use
    assert kv.num_cached_blocks() == 2
    kv.free("a")
    order = kv.pool.free_queue_ids()
    assert kv.reset_prefix_cache() is True
    assert kv.num_cached_blocks() == 0 and kv.pool.free_queue_ids() == order
    assert kv.get_computed_blocks("b", p) == ([], 0)
    assert prefill(kv, "b", p) == ([3, 4, 5], 0)  # caching works again
    assert kv.num_cached_blocks() == 2


# ---- randomized: hits always hold exactly the looked-up prefix ---------------

@pytest.mark.parametrize("hash_name", ["sha256", "weak", "const"])
def test_random_ops_never_share_wrong_kv(hash_name):
    import random

    hash_fn = {"sha256": None,
               "weak": lambda parent, t, extra: bytes([sum(t) % 3]),
               "const": lambda parent, t, extra: b"x"}[hash_name]
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=24, block_size=BS, hash_fn=hash_fn)
    bases = [[rng.randrange(3) for _ in range(16)] for _ in range(4)]
    content = {}  # block id -> (extra_keys, token prefix) its KV holds, once full
    running = {}  # rid -> [token_ids, extra_keys, num_computed]
    num_hit_tokens = 0

    def check_table(rid, tokens, extra, total, hit_ids):
        table = kv.get_block_ids(rid)
        for i, bid in enumerate(table[:total // BS]):
            truth = (extra, tuple(tokens[:(i + 1) * BS]))
            if i < len(hit_ids):
                assert content[bid] == truth  # a hit must hold exactly our prefix
            else:
                content[bid] = truth
        # pool invariants
        free = kv.pool.free_queue_ids()
        assert len(free) == kv.num_free_blocks == sum(b.ref_cnt == 0 for b in kv.pool.blocks)
        assert set(free) == {b.block_id for b in kv.pool.blocks if b.ref_cnt == 0}
        assert all(b.block_hash is None or kv.pool._cached[b.block_hash] is b for b in kv.pool.blocks)

    for step in range(3000):
        op = rng.random()
        if op < 0.35 or not running:
            rid = f"r{step}"
            tokens = rng.choice(bases)[:rng.randrange(1, 17)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
            extra = rng.choice([(), (1,)])
            hit_ids, n = kv.get_computed_blocks(rid, tokens, extra)
            assert n == len(hit_ids) * BS < len(tokens)
            new = rng.randrange(1, len(tokens) - n + 1)  # maybe a chunk
            got = kv.allocate_slots(rid, tokens, n, new, hit_ids, extra)
            if got is None:
                kv.free(rid)
                continue
            num_hit_tokens += n
            assert got[:len(hit_ids)] == hit_ids
            running[rid] = [tokens, extra, n + new]
            check_table(rid, tokens, extra, n + new, hit_ids)
        elif op < 0.85:
            rid = rng.choice(sorted(running))
            tokens, extra, done = running[rid]
            if done == len(tokens):
                tokens.append(rng.randrange(3))  # decode
            new = rng.randrange(1, len(tokens) - done + 1)
            if kv.allocate_slots(rid, tokens, done, new, (), extra) is None:
                continue
            running[rid][2] = done + new
            check_table(rid, tokens, extra, done + new, [])
        else:
            rid = rng.choice(sorted(running))
            kv.free(rid)
            del running[rid]
    for rid in list(running):
        kv.free(rid)
    assert kv.num_free_blocks == 24
    if hash_name == "sha256":
        assert num_hit_tokens > 0
