"""Paged KV-cache blocks: chained block hashing, an LRU free queue, and the pool.

Plain Python bookkeeping for the scheduler; no tensors live here. A block id
indexes the KV tensors that the model runner owns.

Prefix caching. A FULL block's identity is a chained hash
    h_i = H(h_{i-1}, tokens of block i, extra_keys),   h_{-1} = ROOT_HASH,
so equal hashes mean equal prefixes (barring collisions), and `extra_keys`
(LoRA id, cache salt, ...) keeps different adapters/tenants apart.

Exactness does not rest on the hash. A cached block records its content key
(parent hash, token ids, extra_keys) and its *lineage*: the cached block that
held its prefix when it was cached, plus that block's incarnation number
`seq` (unique per caching event, reset on eviction). A lookup walks a prompt
block by block and accepts block i only if its key matches and its recorded
parent is exactly the incarnation accepted at block i-1. By induction every
accepted block holds exactly the prompt's prefix, even if H collides
everywhere; a collision can only cost a cache hit, never return wrong KV.

KV events (for the router's exact index, actors/router/kv_index.py). Once
`record_events()` is called, the pool notes every hash it starts or stops
caching, coalesced to the last thing that happened to each hash (one dict
store per cached or evicted block: no per-token work); `take_events()` hands
them over. The pending set is bounded: past `max_events` distinct hashes it is
dropped and flagged, and the taker sends a full snapshot (`cached_hashes`)
instead. An entry cached under a parent incarnation that has since been
evicted stays reported as cached until it is replaced or evicted: a router
may expect one block too many there, costing one miss, never wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

ROOT_HASH = b""  # h_{-1}: the parent hash of a sequence's first block


def _encode(obj, out: bytearray) -> None:
    """Stable, injective byte encoding of an extra-keys value (tags + lengths)."""
    if obj is None:
        out += b"N"
    elif isinstance(obj, bool):  # before int: bool is an int subclass
        out += b"T" if obj else b"F"
    elif isinstance(obj, int):
        b = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
        out += b"i" + struct.pack("<I", len(b)) + b
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        out += b"s" + struct.pack("<I", len(b)) + b
    elif isinstance(obj, (bytes, bytearray)):
        out += b"b" + struct.pack("<I", len(obj)) + bytes(obj)
    elif isinstance(obj, float):
        out += b"f" + struct.pack("<d", obj)
    elif isinstance(obj, (tuple, list)):
        out += b"t" + struct.pack("<I", len(obj))
        for x in obj:
            _encode(x, out)
    else:
        raise TypeError(f"unhashable extra key of type {type(obj).__name__}: {obj!r}")


_TOKEN_STRUCTS: dict[int, struct.Struct] = {}  # block length -> "<I{n}q" (compiled once)
_NO_EXTRA = b"t" + struct.pack("<I", 0)  # _encode(()) : the common case, precomputed


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, extra_keys: tuple = (),
                        max_blocks: int | None = None) -> list[bytes]:
    """The chained hashes of a prompt's full blocks (at most max_blocks): what the
    prefix cache will look the prompt up by, and what the router matches."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out, h = [], ROOT_HASH
    for b in range(n):
        h = hash_block_tokens(h, token_ids[b * block_size:(b + 1) * block_size], extra_keys)
        out.append(h)
    return out


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int], extra_keys: tuple = ()) -> bytes:
    """sha256 over (parent hash, token ids, extra keys); stable across processes
    (unlike Python's hash()). Every field is length-prefixed, so the encoding is
    injective."""
    n = len(token_ids)
    st = _TOKEN_STRUCTS.get(n)
    if st is None:
        st = _TOKEN_STRUCTS[n] = struct.Struct(f"<I{n}q")
    buf = bytearray(struct.pack("<I", len(parent_hash)))
    buf += parent_hash
    buf += st.pack(n, *token_ids)
    if extra_keys:
        _encode(tuple(extra_keys), buf)
    else:
        buf += _NO_EXTRA
    return hashlib.sha256(buf).digest()


class Block:
    """One KV block. Invariant: ref_cnt == 0  <=>  the block is in the free queue.
    A block with block_hash set is in the pool's cache map under that hash
    (whether in use or free); eviction happens only when it is popped for reuse."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "key", "seq", "parent", "parent_seq",
                 "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.key: tuple | None = None  # (parent_hash, token_ids tuple, extra_keys) while cached
        self.seq = 0  # incarnation: unique per caching event, 0 while uncached
        self.parent: Block | None = None  # cached block holding this block's prefix (None: first block)
        self.parent_seq = 0  # parent's seq when this block was cached
        self.prev: Block | None = None  # free-queue links
        self.next: Block | None = None

    def lineage_alive(self) -> bool:
        """False if the parent incarnation this block was cached under has since
        been evicted: the entry can no longer be reached by a lookup."""
        return self.parent is None or self.parent.seq == self.parent_seq

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinels: O(1) popleft, append,
    and removal from the middle (a prefix hit revives a block from anywhere).
    Head = least recently freed = next to be evicted."""

    def __init__(self, blocks: Iterable[Block]):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def append(self, b: Block) -> None:
        last = self._tail.prev
        last.next, b.prev, b.next, self._tail.prev = b, last, self._tail, b
        self.num_free += 1

    def remove(self, b: Block) -> None:
        b.prev.next, b.next.prev = b.next, b.prev
        b.prev = b.next = None
        self.num_free -= 1

    def popleft(self) -> Block:
        b = self._head.next
        if b is self._tail:
            raise IndexError("no free blocks")
        self.remove(b)
        return b

    def ids(self) -> list[int]:
        out, b = [], self._head.next
        while b is not self._tail:
            out.append(b.block_id)
            b = b.next
        return out


class BlockPool:
    """All blocks, the free queue and the prefix-cache map (hash -> Block)."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)  # initially [0, 1, ..., n-1]
        self._cached: dict[bytes, Block] = {}  # one block per hash: first comer wins
        self._next_seq = 1
        # KV events since the last take: hash -> True (now cached) / False (evicted). None: not recorded.
        self._events: dict[bytes, bool] | None = None
        self.max_events = max(4 * num_blocks, 4096)
        self.events_overflowed = False

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_queue_ids(self) -> list[int]:
        """Free block ids, head (evicted next) to tail. O(num_blocks): tests only."""
        return self.free_queue.ids()

    # ---- KV events -----------------------------------------------------------
    def record_events(self) -> None:
        """Start noting cached/evicted hashes (a taker must call take_events regularly)."""
        if self._events is None:
            self._events = {}

    def take_events(self) -> tuple[list[bytes], list[bytes], bool]:
        """(stored, removed, overflowed) since the last take, each hash's last change
        only; overflowed: some were dropped, the taker must send a snapshot."""
        ev, over = self._events, self.events_overflowed
        if not ev and not over:
            return [], [], False
        self._events, self.events_overflowed = {}, False
        stored = [h for h, cached in ev.items() if cached]
        removed = [h for h, cached in ev.items() if not cached]
        return stored, removed, over

    def cached_hashes(self) -> list[bytes]:
        """Every hash cached now (a snapshot); pending events are dropped with it."""
        if self._events is not None:
            self._events, self.events_overflowed = {}, False
        return list(self._cached)

    def _note(self, block_hash: bytes, cached: bool) -> None:
        ev = self._events
        ev[block_hash] = cached
        if len(ev) > self.max_events:  # nobody took them: forget them, flag a snapshot
            ev.clear()
            self.events_overflowed = True

    def get_new_blocks(self, n: int) -> list[Block]:
        """Pop n blocks from the free-queue head (LRU), evicting their cached hashes."""
        if n > self.free_queue.num_free:
            raise ValueError(f"asked for {n} blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            b = self.free_queue.popleft()
            if b.block_hash is not None:
                self._uncache(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on (cached) blocks; free ones leave the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[Block]) -> None:
        """Drop a reference on each; blocks reaching 0 go to the tail in the given
        order (so the first given is evicted first). They keep their hashes."""
        for b in ordered_blocks:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, b
            if b.ref_cnt == 0:
                self.free_queue.append(b)

    def get_cached_block(self, block_hash: bytes, parent_hash: bytes, token_ids: Sequence[int],
                         extra_keys: tuple, parent: Block | None) -> Block | None:
        """The cached block holding exactly these tokens after the prefix held by
        `parent` (a block this same lookup just accepted; None for block 0), or None."""
        b = self._cached.get(block_hash)
        if (b is None or b.parent is not parent
                or b.parent_seq != (parent.seq if parent is not None else 0)
                or b.key != (parent_hash, tuple(token_ids), extra_keys)):
            return None
        return b

    def cache_full_block(self, block: Block, block_hash: bytes, parent_hash: bytes,
                         token_ids: Sequence[int], extra_keys: tuple,
                         parent: Block | None) -> Block | None:
        """Offer a full block (holding these tokens after the prefix held by the
        cached block `parent`) to the cache. Returns the canonical cached block
        for this content -- `block` itself, or an already cached identical block
        (e.g. computed concurrently by another request) -- or None if the hash
        is held by a different live entry (a collision: nothing is cached)."""
        if block.block_hash is not None:  # already cached: a prefix hit
            return block
        pseq = parent.seq if parent is not None else 0
        key = (parent_hash, tuple(token_ids), extra_keys)
        cur = self._cached.get(block_hash)
        if cur is not None:
            if cur.parent is parent and cur.parent_seq == pseq and cur.key == key:
                return cur
            if cur.lineage_alive():
                return None  # keep the existing entry; never risk wrong KV
            self._uncache(cur)  # unreachable entry (its parent was evicted): reuse the key
        block.block_hash, block.key = block_hash, key
        block.parent, block.parent_seq = parent, pseq
        block.seq, self._next_seq = self._next_seq, self._next_seq + 1
        self._cached[block_hash] = block
        if self._events is not None:
            self._note(block_hash, True)
        return block

    def _uncache(self, b: Block) -> None:
        # Resetting seq kills every child's lineage (child.parent_seq != 0).
        del self._cached[b.block_hash]
        if self._events is not None:
            self._note(b.block_hash, False)
        b.block_hash = b.key = b.parent = None
        b.seq = b.parent_seq = 0

    def reset_prefix_cache(self) -> bool:
        """Drop every hash; refused (False) while any block is in use."""
        if self.free_queue.num_free != self.num_blocks:
            return False
        for b in list(self._cached.values()):
            self._uncache(b)
        return True
