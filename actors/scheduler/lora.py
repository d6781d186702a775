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

from collections import deque

from ziggurat.actors.scheduler.request import Request
from ziggurat.models.lora import SlotTable


class AdapterSlots:
    def __init__(self, max_loras: int, max_cpu_loras: int):
        self.max_loras = max_loras
        self.table = SlotTable(max_loras, max_cpu_loras)
        self.names: dict[str, str] = {}  # adapter key -> name, for the keys the table knows
        self._slot: dict[str, int] = {}  # request id -> its slot while it holds a row

    def fits(self, req: Request) -> bool:
        """May `req` join the running batch without a (max_loras + 1)-th adapter?"""
        lr = req.sampling_params.lora_request
        return lr is None or self.table.holds(lr.key) or self.table.in_use() < self.max_loras

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
