"""IngressStreams: which ingress reads each request's tokens, and the numbering of what is sent there.

Each step's updates leave as one TokenBatch per ingress. Ray may deliver
concurrent calls out of order, so batches are numbered per (replica, ingress
incarnation) from 0 and the ingress applies them strictly in order. A
restarted ingress registers under a new epoch: its numbering starts afresh
and the streams it held before the restart (nobody reads them now) are
returned for aborting.
"""

from __future__ import annotations

import collections

from ziggurat.actors.scheduler.messages import StepUpdates, TokenBatch


class IngressStreams:
    def __init__(self, replica: int, incarnation: str = ""):
        self.replica, self.incarnation = replica, incarnation
        self.routes: dict[str, str] = {}  # request id -> ingress id
        self.epochs: dict[str, str] = {}  # ingress id -> its current incarnation
        self.seq: dict[str, int] = collections.defaultdict(int)  # next TokenBatch number per ingress

    def register(self, ingress_id: str, epoch: str) -> tuple[list[str], int]:
        """A (re)started ingress: (the requests it held before, which nobody reads
        now, and the number of the next batch it will get). The orphans' routes
        are dropped here, so no update of theirs is ever numbered for the new
        incarnation (a batch it could not place would stall its sequence)."""
        if self.epochs.get(ingress_id) == epoch:
            return [], self.seq[ingress_id]
        orphans = [rid for rid, ing in self.routes.items() if ing == ingress_id]
        for rid in orphans:
            del self.routes[rid]
        self.epochs[ingress_id] = epoch
        self.seq[ingress_id] = 0
        return orphans, 0

    def add(self, request_id: str, ingress_id: str) -> None:
        self.routes[request_id] = ingress_id

    def drop(self, request_id: str) -> None:
        self.routes.pop(request_id, None)

    def split(self, updates: StepUpdates, sent_at: float = 0.0) -> list[tuple[str, TokenBatch]]:
        """The step's columns split by ingress, each numbered next in its sequence (sent_at: the
        wall clock of publishing, for the ingress's delivery histogram)."""
        ids, routes = updates.request_ids, self.routes
        groups: dict[str, list[int]] = {}
        for i, rid in enumerate(ids):
            ingress = routes.get(rid)
            if ingress is not None:
                g = groups.get(ingress)
                if g is None:
                    g = groups[ingress] = []
                g.append(i)
        batches = []
        for ingress, idx in groups.items():
            part = updates if len(idx) == len(ids) else updates.take(idx)
            batches.append((ingress, TokenBatch(self.replica, self.epochs.get(ingress, ""), self.seq[ingress], part,
                                                self.incarnation, sent_at)))
            self.seq[ingress] += 1
        return batches
