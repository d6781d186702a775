"""The running batch: requests in admission order, their per-step counters as numpy columns.

A decode step touches every running request twice (schedule one token, take
one token back), so those two passes are array operations over columns
here, and Python runs only for the few requests that need something else
(a new KV block, a stop check, a finish, a preemption). See Scheduler.

While a request is in the set, the set's columns hold its `num_computed_tokens`
and `num_pending`; the Request's own fields are written back when it leaves
(pop/remove), and read in on append. `row_pos` maps a worker row (see
models/step.py) to its request's position: a step's output (rows and
tokens) finds its rows with one gather, and a request its own with `index`.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ziggurat.actors.scheduler.request import Request

_INT_COLS = (
    "computed",  # tokens whose KV is computed (or scheduled in a step in flight)
    "known",  # len(all_token_ids): prompt + output ids known on the host
    "pending",  # tokens sampled by steps in flight, ids not known yet
    "out",  # len(output_token_ids)
    "max_out",  # the output length at which the request ends
    "min_tokens",  # no stop check before this many outputs
    "prompt",  # prompt length
    "cached",  # prefix-cache hit at first scheduling
    "kv_cap",  # rows its KV blocks hold
    "kv_cache_lim",  # known length at which a full block must be offered to the prefix cache
    "row",  # the request's row in the workers
)
# True where the stop check needs Python every token (stop_token_ids, or an
# end-of-sequence set other than the scheduler's default).
_BOOL_COLS = ("py_stop", "grammar")  # grammar: structured output (its token must reach the host before the next)


class RunningSet:
    def __init__(self, capacity: int = 64):
        self.reqs: list[Request] = []
        self._cap = capacity
        for c in _INT_COLS:
            setattr(self, c, np.zeros(capacity, dtype=np.int64))
        for c in _BOOL_COLS:
            setattr(self, c, np.zeros(capacity, dtype=bool))
        self.row_pos = np.full(capacity, -1, dtype=np.int64)  # row -> position, -1: not running

    def __len__(self) -> int:
        return len(self.reqs)

    def _grow(self) -> None:
        self._cap *= 2
        for c in _INT_COLS + _BOOL_COLS:
            old = getattr(self, c)
            new = np.zeros(self._cap, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, c, new)

    def append(self, req: Request, kv_limits: tuple[int, int], default_eos: tuple[int, ...]) -> None:
        i = len(self.reqs)
        if i == self._cap:
            self._grow()
        p = req.sampling_params
        self.reqs.append(req)
        self.computed[i] = req.num_computed_tokens
        self.known[i] = len(req.all_token_ids)
        self.pending[i] = req.num_pending
        self.out[i] = len(req.output_token_ids)
        self.max_out[i] = 1 if req.handoff else req.max_tokens  # a prefill hand-off stops at its first token
        self.min_tokens[i] = p.min_tokens
        self.prompt[i] = len(req.prompt_token_ids)
        self.cached[i] = max(req.num_cached_tokens, 0)
        self.kv_cap[i], self.kv_cache_lim[i] = kv_limits
        self.row[i] = req.row
        if req.row >= len(self.row_pos):
            grown = np.full(max(2 * len(self.row_pos), req.row + 1), -1, dtype=np.int64)
            grown[: len(self.row_pos)] = self.row_pos
            self.row_pos = grown
        self.row_pos[req.row] = i
        self.grammar[i] = req.grammar is not None
        self.py_stop[i] = bool(p.stop_token_ids) or (not p.ignore_eos and tuple(req.eos_token_ids) != default_eos)

    def _write_back(self, i: int) -> None:
        r = self.reqs[i]
        r.num_computed_tokens = int(self.computed[i])
        r.num_pending = int(self.pending[i])

    def pop(self) -> Request:
        """The last admitted request (the preemption victim), its counters written back."""
        i = len(self.reqs) - 1
        self._write_back(i)
        self.row_pos[self.row[i]] = -1
        return self.reqs.pop()

    def remove(self, indices) -> list[Request]:
        """Remove the requests at `indices` (counters written back), keeping the order of the rest."""
        drop = sorted(set(int(i) for i in indices))
        if not drop:
            return []
        for i in drop:
            self._write_back(i)
        gone = [self.reqs[i] for i in drop]
        m = len(self.reqs)
        keep = np.ones(m, dtype=bool)
        keep[drop] = False
        k = int(keep.sum())
        self.row_pos[self.row[drop]] = -1
        for c in _INT_COLS + _BOOL_COLS:
            col = getattr(self, c)
            col[:k] = col[:m][keep]
        self.row_pos[self.row[:k]] = np.arange(k)
        dropset = set(drop)
        self.reqs = [r for i, r in enumerate(self.reqs) if i not in dropset]
        return gone

    def index(self, req: Request) -> int:
        """The position of a running request (its row's)."""
        return int(self.row_pos[req.row])


class RowPool:
    """Hands out worker rows. A freed row may still appear in the output of
    steps already scheduled (they run while the scheduler works), so it is
    handed out again only once every step scheduled before it was freed has
    had its output applied (`done`): a late token can never be taken for the
    row's next request."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._cooling: deque[tuple[int, int]] = deque()  # (steps scheduled when freed, row)
        self._next = 0
        self.scheduled = 0  # steps scheduled so far
        self.done = 0  # steps below this id have had their output applied (or were dropped)

    def take(self) -> int:
        cool = self._cooling
        while cool and cool[0][0] <= self.done:
            self._free.append(cool.popleft()[1])
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def release(self, row: int) -> None:
        self._cooling.append((self.scheduled, row))

    @property
    def num_issued(self) -> int:
        """Rows ever created (the workers' tables are at least this tall)."""
        return self._next
