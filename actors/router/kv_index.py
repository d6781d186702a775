"""What the router believes each replica's prefix cache holds.

KVIndex is exact: a mirror of every replica's cached block hashes, fed by the
schedulers' KVEvents (actors/scheduler/messages.py), one bit per replica:

    holders: block hash -> bitmask of replicas caching it      (bit r = replica r)
    held:    replica    -> its hashes (to replace on a snapshot, to drop on a rebuild)

Each replica's messages are numbered per incarnation (epoch, seq). A message
that is not the next one (a lost message, a router that restarted, a replica
rebuilt) is applied anyway and answered "send a snapshot"; the snapshot then
replaces that replica's entries. A replica that is heard from only through its
stats (an idle one sends no KV events) is asked too (`wants_snapshot`), so a
new router learns an idle replica's cache within one report. Memory is bounded by the caches themselves:
at most one entry per cached block of each replica.

RecentPicks bridges the events' latency: blocks of requests this router has
just sent to a replica count as held there for `ttl_s` (or until that replica
reports evicting them), so a burst of requests sharing a new prefix follows
the first one instead of spreading before its blocks are reported.

AffinityIndex is the approximate index of the `prefix-affinity` policy (kept
for A/B): hash -> the replica this router last sent it to, LRU-bounded; it
never sees evictions.

All three are matched the same way: the number of *leading* prompt blocks a
replica holds (a block whose parent is missing is useless to a lookup).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from ziggurat.actors.scheduler.messages import KVEvents

RESYNC_S = 1.0  # an unanswered snapshot request is repeated after this long


def leading_matches(hashes: list[bytes], candidates: list[int], holders) -> dict[int, int]:
    """Per candidate replica, how many leading `hashes` it holds; holders(h) -> bitmask."""
    alive = 0
    for r in candidates:
        alive |= 1 << r
    out = dict.fromkeys(candidates, 0)
    for i, h in enumerate(hashes):
        still = holders(h) & alive
        gone = alive & ~still
        while gone:
            low = gone & -gone
            out[low.bit_length() - 1] = i
            gone ^= low
        alive = still
        if not alive:
            return out
    while alive:
        low = alive & -alive
        out[low.bit_length() - 1] = len(hashes)
        alive ^= low
    return out


class KVIndex:
    def __init__(self, clock=time.monotonic):
        self.holders: dict[bytes, int] = {}
        self.held: dict[int, set[bytes]] = {}
        self.epoch: dict[int, str] = {}
        self.next_seq: dict[int, int] = {}
        self.synced: dict[int, bool] = {}  # False: waiting for a snapshot
        self.asked_at: dict[int, float] = {}
        self.block_size: dict[int, int] = {}
        self.clock = clock
        self.gaps = 0  # messages that were not the next expected one
        self.snapshots = 0

    def apply(self, ev: KVEvents) -> bool:
        """Apply one replica's message; True: that replica should send a snapshot."""
        r = ev.replica
        if ev.snapshot:
            if self.epoch.get(r) == ev.epoch and ev.seq < self.next_seq.get(r, 0):
                return False  # older than what we have
            self._replace(r, ev.stored)
            self.epoch[r], self.next_seq[r], self.synced[r] = ev.epoch, ev.seq + 1, True
            self.snapshots += 1
            return False
        same = self.epoch.get(r) == ev.epoch
        if same and ev.seq < self.next_seq[r]:
            return False  # a duplicate
        in_order = same and ev.seq == self.next_seq[r] and self.synced.get(r, False)
        if not same:
            self.drop(r)  # a new incarnation's cache started empty; or we know nothing of this one
        self._apply(r, ev.stored, ev.removed)
        self.epoch[r], self.next_seq[r] = ev.epoch, ev.seq + 1
        if in_order:
            return False
        self.gaps += 1
        self.synced[r] = False
        now = self.clock()
        if now - self.asked_at.get(r, -RESYNC_S) >= RESYNC_S:
            self.asked_at[r] = now
            return True
        return False

    def wants_snapshot(self, r: int) -> bool:
        """Replica r is alive (it reported) but its cache is not mirrored here (never heard
        of, or a gap not yet mended): True, at most once per RESYNC_S, to ask it for one."""
        if self.synced.get(r, False):
            return False
        now = self.clock()
        if now - self.asked_at.get(r, -RESYNC_S) < RESYNC_S:
            return False
        self.asked_at[r] = now
        return True

    def _apply(self, r: int, stored, removed) -> None:
        bit, holders, held = 1 << r, self.holders, self.held.setdefault(r, set())
        for h in removed:
            if h in held:
                held.discard(h)
                m = holders[h] & ~bit
                if m:
                    holders[h] = m
                else:
                    del holders[h]
        for h in stored:
            if h not in held:
                held.add(h)
                holders[h] = holders.get(h, 0) | bit

    def _replace(self, r: int, hashes) -> None:
        new, old = set(hashes), self.held.get(r, set())
        self._apply(r, new - old, old - new)

    def drop(self, r: int) -> None:
        """Forget replica r's entries (a new incarnation of it starts from nothing)."""
        self._apply(r, (), list(self.held.get(r, ())))
        self.held.pop(r, None)
        for d in (self.epoch, self.next_seq, self.synced):
            d.pop(r, None)

    def mask(self, h: bytes) -> int:
        return self.holders.get(h, 0)

    def num_blocks(self, r: int) -> int:
        return len(self.held.get(r, ()))


class RecentPicks:
    """hash -> (replicas this router just sent it to, expiry), LRU-bounded."""

    def __init__(self, ttl_s: float = 2.0, max_entries: int = 200_000, clock=time.monotonic):
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self.entries: OrderedDict[bytes, list] = OrderedDict()  # hash -> [mask, expiry]

    def add(self, hashes: list[bytes], r: int) -> None:
        if self.ttl_s <= 0:
            return
        bit, exp, ent = 1 << r, self.clock() + self.ttl_s, self.entries
        for h in hashes:
            e = ent.get(h)
            if e is None:
                ent[h] = [bit, exp]
            else:
                e[0] |= bit
                e[1] = exp
                ent.move_to_end(h)
        self._purge()

    def evicted(self, r: int, hashes) -> None:
        """Replica r reports these gone: it no longer holds them, recent pick or not."""
        ent, keep = self.entries, ~(1 << r)
        for h in hashes:
            e = ent.get(h)
            if e is not None:
                e[0] &= keep

    def forget(self, r: int) -> None:
        keep = ~(1 << r)
        for e in self.entries.values():
            e[0] &= keep

    def mask(self, h: bytes) -> int:
        e = self.entries.get(h)
        if e is None or e[1] < self.clock():
            return 0
        return e[0]

    def _purge(self) -> None:
        ent, now = self.entries, self.clock()
        while ent:
            h, e = next(iter(ent.items()))
            if e[1] >= now and len(ent) <= self.max_entries:
                break
            del ent[h]


class AffinityIndex:
    """The prefix-affinity policy's approximate index: hash -> the replica last sent it."""

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self.entries: OrderedDict[bytes, int] = OrderedDict()

    def observe(self, hashes: list[bytes], r: int) -> None:
        for h in hashes:
            self.entries[h] = r
            self.entries.move_to_end(h)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def mask(self, h: bytes) -> int:
        r = self.entries.get(h)
        return 0 if r is None else 1 << r

    def forget(self, r: int) -> None:
        for h in [h for h, rep in self.entries.items() if rep == r]:
            del self.entries[h]
