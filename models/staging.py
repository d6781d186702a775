"""Host -> device transfers of a step's small integer inputs, in one copy.

A step's inputs (token ids, positions, slots, lengths, ...) are a few small
int64 arrays. Copying each from pageable memory costs a synchronous transfer
apiece; here they are packed into one pinned buffer and sent with one
asynchronous copy. Buffers come from a ring, and a buffer is reused only
once the copy that last read it has finished (an event per buffer), so
filling the next step's inputs never races a copy still in flight. A step
uses up to three buffers and the runner works at most one step ahead of the
GPU, so with eight the event waits are normally already satisfied.
"""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    def __init__(self, device: torch.device, slots: int = 8):
        self.device = device
        self.pinned = device.type == "cuda"
        self._bufs = [torch.zeros(0, dtype=torch.long) for _ in range(slots)]
        self._events: list = [None] * slots
        self._next = 0

    def buffer(self, numel: int) -> torch.Tensor:
        """A host int64 buffer of at least numel elements that no pending copy reads."""
        i = self._next
        self._next = (i + 1) % len(self._bufs)
        if self._events[i] is not None:
            self._events[i].synchronize()
            self._events[i] = None
        if self._bufs[i].numel() < numel:
            self._bufs[i] = torch.zeros(max(numel, 2 * self._bufs[i].numel(), 256), dtype=torch.long,
                                        pin_memory=self.pinned)
        self._last = i
        return self._bufs[i]

    def copy_to(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst.copy_(src) where src is (a view of) the buffer just returned."""
        dst.copy_(src, non_blocking=self.pinned)
        self._mark()

    def upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Send int64 arrays in one copy; returns device views, one per array."""
        # Each array starts on a 64-byte boundary: Triton specializes kernels on
        # pointer alignment, and unaligned views would compile new variants.
        sizes = [len(a) for a in arrays]
        starts, at = [], 0
        for n in sizes:
            starts.append(at)
            at += -(-n // 8) * 8
        host = self.buffer(at)[:at]
        h = host.numpy()
        for a, s in zip(arrays, starts):
            h[s : s + len(a)] = a
        dev = host.to(self.device, non_blocking=True) if self.pinned else host.clone()
        self._mark()
        return [dev[s : s + n] for s, n in zip(starts, sizes)]

    def _mark(self) -> None:
        if self.pinned:
            ev = torch.cuda.Event()
            ev.record()
            self._events[self._last] = ev
