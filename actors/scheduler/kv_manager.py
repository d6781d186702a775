"""KVCacheManager: per-request block tables on top of BlockPool, with prefix caching.

The only KV-memory interface the scheduler uses. Contract with the caller:
  * a request's token_ids only grow by appending (hashes are remembered per
    request and never recomputed), and its extra_keys never change;
  * prefix hits from get_computed_blocks are passed to the very next
    allocate_slots of that request (an allocation for another request in
    between may evict them; that is detected and raises);
  * free(request_id) is called for every request that called
    get_computed_blocks or allocate_slots (finished, aborted or preempted).
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import block_pool as _bp
from .block_pool import ROOT_HASH, Block, BlockPool

HashFn = Callable[[bytes, Sequence[int], tuple], bytes]


class _Request:
    __slots__ = ("blocks", "hashes", "extra_keys", "hits", "num_cached", "canon", "canon_seq")

    def __init__(self, extra_keys: tuple):
        self.blocks: list[Block] = []  # the block table
        self.hashes: list[bytes] = []  # chained hashes of the full blocks seen so far
        self.extra_keys = extra_keys
        self.hits: list[tuple[Block, int]] = []  # last lookup's hits with their seq
        # Leading full blocks already offered to the cache. `canon` is the cached
        # block whose content equals blocks[num_cached-1]'s (that block itself, or
        # an identical one cached first); canon_seq detects its later eviction.
        # canon is None with num_cached > 0 means the chain broke: cache no more.
        self.num_cached = 0
        self.canon: Block | None = None
        self.canon_seq = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn | None = None):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash_fn: HashFn = hash_fn or _bp.hash_block_tokens
        self.pool = BlockPool(num_blocks)
        self._reqs: dict[str, _Request] = {}

    # ---- metrics -----------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.num_blocks

    def num_cached_blocks(self) -> int:
        return self.pool.num_cached_blocks()

    # ---- KV events (block_pool.py) and read-only lookups ----------------------
    def record_events(self) -> None:
        self.pool.record_events()

    def take_events(self) -> tuple[list[bytes], list[bytes], bool]:
        return self.pool.take_events()

    def cached_hashes(self) -> list[bytes]:
        return self.pool.cached_hashes()

    def probe(self, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
        """Leading prompt tokens a lookup would hit now, touching nothing (an oracle's view)."""
        if not self.enable_prefix_caching:
            return 0
        bs, extra = self.block_size, tuple(extra_keys)
        hashes, h = [], ROOT_HASH
        for i in range(max(0, (len(token_ids) - 1) // bs)):
            h = self._hash_fn(h, tuple(token_ids[i * bs:(i + 1) * bs]), extra)
            hashes.append(h)
        return len(self._cached_prefix(hashes, token_ids, extra)) * bs

    def get_block_ids(self, request_id: str) -> list[int]:
        st = self._reqs.get(request_id)
        return [b.block_id for b in st.blocks] if st else []

    # ---- scheduler API -----------------------------------------------------
    def get_computed_blocks(self, request_id: str, token_ids: Sequence[int],
                            extra_keys: tuple = ()) -> tuple[list[int], int]:
        if not self.enable_prefix_caching:
            return [], 0
        st = self._state(request_id, extra_keys)
        bs = self.block_size
        self._update_hashes(st, token_ids, len(token_ids) // bs)
        hits = self._cached_prefix(st.hashes, token_ids, st.extra_keys)
        st.hits = [(b, b.seq) for b in hits]
        return [b.block_id for b in hits], len(hits) * bs

    def _cached_prefix(self, hashes: list[bytes], token_ids: Sequence[int], extra_keys: tuple) -> list[Block]:
        """The cached blocks holding the prompt's leading full blocks (`hashes`: their chained
        hashes), leaving at least one token to compute (the model must produce logits)."""
        bs = self.block_size
        hits: list[Block] = []
        parent, parent_hash = None, ROOT_HASH
        for i in range(min(len(hashes), max(0, (len(token_ids) - 1) // bs))):
            h = hashes[i]
            b = self.pool.get_cached_block(h, parent_hash, token_ids[i * bs:(i + 1) * bs], extra_keys, parent)
            if b is None:
                break
            hits.append(b)
            parent, parent_hash = b, h
        return hits

    def allocate_slots(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                       num_new_tokens: int, new_computed_block_ids: Sequence[int] = (),
                       extra_keys: tuple = (), num_pending_tokens: int = 0, cache: bool = True) -> list[int] | None:
        """`num_pending_tokens`: tokens already scheduled whose ids are not known
        yet (sampled by a step still running); their slots are allocated, and
        blocks are offered to the prefix cache only as far as ids are known.
        cache=False: offer nothing to the prefix cache yet (the blocks' KV comes
        from elsewhere, later: cache_blocks once it has arrived)."""
        bs = self.block_size
        st = self._reqs.get(request_id)
        total = num_computed_tokens + num_new_tokens
        if (st is not None and not new_computed_block_ids and total <= len(st.blocks) * bs
                and (not self.enable_prefix_caching or min(total, len(token_ids)) // bs <= st.num_cached)):
            return []  # decode fast path: the slots exist and no block became full
        is_new = st is None
        if is_new:
            st = _Request(tuple(extra_keys))
        elif st.extra_keys != tuple(extra_keys):
            raise ValueError(f"{request_id}: extra_keys changed ({st.extra_keys} -> {extra_keys})")
        if len(token_ids) + num_pending_tokens < total:
            raise ValueError(f"{request_id}: {len(token_ids)} token ids for {total} tokens")
        hits = self._check_hits(request_id, st, new_computed_block_ids, num_computed_tokens)

        num_new = max(0, -(-total // bs) - len(st.blocks) - len(hits))
        # Hits sitting in the free queue leave it when touched: count them as spent.
        if num_new + sum(b.ref_cnt == 0 for b in hits) > self.pool.num_free_blocks:
            return None  # nothing has changed
        self.pool.touch(hits)
        new = self.pool.get_new_blocks(num_new)
        st.blocks += hits
        st.blocks += new
        st.hits = []
        if is_new:
            self._reqs[request_id] = st
        if self.enable_prefix_caching and cache:
            self._cache_full_blocks(st, token_ids, min(total, len(token_ids)) // bs)
        return [b.block_id for b in hits] + [b.block_id for b in new]

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        """Offer the full blocks of a request's first `num_tokens` tokens to the
        prefix cache (after an allocation with cache=False, once their KV is in)."""
        st = self._reqs.get(request_id)
        if st is not None and self.enable_prefix_caching:
            self._cache_full_blocks(st, token_ids, num_tokens // self.block_size)

    def fast_limits(self, request_id: str) -> tuple[int, int]:
        """(slots held, known length from which a full block waits for the prefix
        cache): while a request's computed + new tokens stay within the first
        and min(that, its known tokens) under the second, allocate_slots has
        nothing to do (its decode fast path). The scheduler checks this for the
        whole batch at once."""
        st = self._reqs.get(request_id)
        if st is None:
            return 0, 0
        bs = self.block_size
        return len(st.blocks) * bs, (st.num_cached + 1) * bs if self.enable_prefix_caching else 1 << 62

    def free(self, request_id: str) -> None:
        st = self._reqs.pop(request_id, None)
        if st is not None:
            # Reverse: a sequence's tail is evicted first, shared prefixes live longest.
            self.pool.free_blocks(reversed(st.blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    # ---- internals ---------------------------------------------------------
    def _state(self, request_id: str, extra_keys: tuple) -> _Request:
        st = self._reqs.get(request_id)
        if st is None:
            st = self._reqs[request_id] = _Request(tuple(extra_keys))
        elif st.extra_keys != tuple(extra_keys):
            raise ValueError(f"{request_id}: extra_keys changed ({st.extra_keys} -> {extra_keys})")
        return st

    def _check_hits(self, request_id: str, st: _Request, ids: Sequence[int],
                    num_computed_tokens: int) -> list[Block]:
        """Map hit ids to blocks, checking they are (a prefix of) this request's
        last lookup and that none was evicted since (seq unchanged)."""
        if not ids:
            return []
        if st.blocks:
            raise ValueError(f"{request_id}: prefix hits are only allowed on the first allocation")
        if len(ids) > len(st.hits) or len(ids) * self.block_size > num_computed_tokens:
            raise ValueError(f"{request_id}: hits {list(ids)} do not come from get_computed_blocks")
        out = []
        for bid, (b, seq) in zip(ids, st.hits):
            if b.block_id != bid:
                raise ValueError(f"{request_id}: hits {list(ids)} do not come from get_computed_blocks")
            if b.seq != seq:
                raise ValueError(f"{request_id}: prefix hit {bid} was evicted after get_computed_blocks")
            out.append(b)
        return out

    def _update_hashes(self, st: _Request, token_ids: Sequence[int], num_full: int) -> None:
        """Incremental: only blocks not hashed before are hashed."""
        hs, bs = st.hashes, self.block_size
        h = hs[-1] if hs else ROOT_HASH
        for i in range(len(hs), num_full):
            h = self._hash_fn(h, tuple(token_ids[i * bs:(i + 1) * bs]), st.extra_keys)
            hs.append(h)

    def _cache_full_blocks(self, st: _Request, token_ids: Sequence[int], num_full: int) -> None:
        """Offer blocks [num_cached, num_full) of the table to the cache, in order."""
        num_full = min(num_full, len(st.blocks))
        if st.num_cached >= num_full:
            return
        if st.num_cached > 0 and (st.canon is None or st.canon.seq != st.canon_seq):
            # Chain broken (collision) or its canonical prefix got evicted: a child
            # cached now could never be reached, so stop caching this request.
            st.num_cached, st.canon = num_full, None
            return
        self._update_hashes(st, token_ids, num_full)
        bs = self.block_size
        for i in range(st.num_cached, num_full):
            c = self.pool.cache_full_block(
                st.blocks[i], st.hashes[i], st.hashes[i - 1] if i else ROOT_HASH,
                token_ids[i * bs:(i + 1) * bs], st.extra_keys, st.canon)
            st.canon, st.canon_seq = c, (c.seq if c is not None else 0)
            if c is None:
                break
        st.num_cached = num_full
