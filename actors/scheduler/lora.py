"""The scheduler's view of one replica's LoRA slots: the per-batch cap and residency.

The workers give an adapter a GPU slot when a request using it arrives and
take it back when no request holding a row uses it (models/lora.py). So the
running batch may hold at most max_loras distinct adapters: a waiting request
whose adapter would be one too many is passed over (the first request in the
queue that fits goes first; the others keep their order) until a slot frees.

This mirror runs the workers' own SlotTable over the same events (a request
taking a row, its row released), so it knows which adapters are in the GPU
slots and in the workers' host memory: `resident()` is what the router needs
to prefer replicas where an adapter is warm, at no cost.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from ziggurat.actors.scheduler.request import Request
from ziggurat.models.lora import SlotTable


class AdapterSlots:
    def __init__(self, max_loras: int, max_cpu_loras: int):
        self.max_loras = max_loras
        self.table = SlotTable(max_loras, max_cpu_loras)
        self.names: dict[str, str] = {}  # adapter key -> name, for the keys the table knows
        self._slot: dict[str, int] = {}  # request id -> its slot while it holds a row
        # Prefetch: a request whose adapter would be read from disk waits until the workers
        # have read it on a background thread (StepInput.lora_prefetch -> StepOutput.lora_staged),
        # so the step that admits it does not stall every stream for the read. At most
        # `prefetch_cap` reads are asked for or held; past that a request is admitted and read
        # in its step, as without prefetch.
        self.prefetch_cap = max(1, max_cpu_loras)
        self.asked: dict[str, object] = {}  # key -> LoRARequest sent for prefetch, not reported done
        self.staged: OrderedDict[str, None] = OrderedDict()  # keys read ahead, not yet taken
        self.outbox: list = []  # LoRARequests for the next step's lora_prefetch

    def fits(self, req: Request) -> bool:
        """May `req` join the running batch now: without a (max_loras + 1)-th adapter, and
        with its adapter in memory (else its read is asked for, and it waits)?"""
        lr = req.sampling_params.lora_request
        if lr is None:
            return True
        if not (self.table.holds(lr.key) or self.table.in_use() < self.max_loras):
            return False
        return self._ready(lr)

    def _ready(self, lr) -> bool:
        key = lr.key
        if key in self.staged or key in self.table.resident():
            return True
        if key in self.asked:
            return False
        if len(self.asked) >= self.prefetch_cap:
            return True  # no room to read ahead: read in the step
        self.asked[key] = lr
        self.outbox.append(lr)
        return False

    def take_outbox(self) -> list:
        out, self.outbox = self.outbox, []
        return out

    def staged_done(self, keys) -> None:
        """The workers finished reading these adapters (StepOutput.lora_staged)."""
        for k in keys:
            if self.asked.pop(k, None) is not None:
                self.staged[k] = None
                while len(self.staged) > self.prefetch_cap:  # stale: their requests went away
                    self.staged.popitem(last=False)

    @property
    def prefetching(self) -> bool:
        """Reads asked for and not reported done: the engine keeps stepping to hear of them."""
        return bool(self.asked)

    def first_fitting(self, waiting: deque) -> bool:
        """Move the first waiting request that fits to the head of `waiting`; False if none does."""
        for i, req in enumerate(waiting):
            if self.fits(req):
                if i:
                    del waiting[i]
                    waiting.appendleft(req)
                return True
        return False

    def take(self, req: Request) -> None:
        """`req` took a row (it is sent to the workers, who acquire its adapter's slot)."""
        lr = req.sampling_params.lora_request
        if lr is not None:
            slot, fill, _, _ = self.table.acquire(lr.key)
            self.staged.pop(lr.key, None)
            self._slot[req.request_id] = slot
            self.names[lr.key] = lr.lora_name
            if fill:  # a slot changed hands: forget names no longer resident
                keep = self.table.resident()
                self.names = {k: v for k, v in self.names.items() if k in keep}

    def release(self, req: Request) -> None:
        """`req`'s row is released (the workers free it with the next step)."""
        slot = self._slot.pop(req.request_id, None)
        if slot is not None:
            self.table.release(slot)

    def resident(self) -> list[str]:
        """Names of the adapters in the workers' GPU slots or host memory (no disk read to serve them)."""
        return sorted({self.names[k] for k in self.table.resident() if k in self.names})

    @property
    def active(self) -> int:
        """Distinct adapters among the requests holding rows."""
        return self.table.in_use()
