"""CUDA graphs for decode steps: the model's forward captured once per batch-size bucket.

An eager decode step launches about fifteen kernels per layer, hundreds per
step, and at small batches the host cannot launch them as fast as the GPU
runs them. A replayed graph launches them all at once.

A graph reads fixed addresses, so each one is captured over static input
buffers that the runner fills before replay:

    tokens[5, N] int64   rows: input ids, positions, KV slots, context lengths, block-table rows
    block_tables[N, W]   gathered on the GPU from the runner's persistent table

With LoRA, the batch's adapter tiles (kernels/lora.py) are static inputs too:

    lora[N + n_tiles * 16 + n_tiles] int64   each token's slot | tile tokens | tile slots

n_tiles follows from the bucket and the slot count alone, so any mix of
adapters replays the same graph. A step with no adapter in it replays a second
graph of the same bucket captured without the LoRA ops (`base_graphs`): the
base model's launches only, as on an engine without LoRA (the LoRA graph's
launches cost ~0.6 ms a step on an 8B at batch 128 even with every tile unused).

A batch of b decodes replays the smallest bucket >= b. Padding rows have
context length 0 and slot -1: they store no KV and their attention output is
zero, and what the rest of the layers compute for them is never read. The
decode kernel's grid is sized at capture for max_model_len; its split length
follows each sequence's actual length at run time.

Graphs share one memory pool; capture goes from the largest bucket down so
the smaller ones reuse its memory.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ziggurat.kernels.attention import AttentionMetadata
from ziggurat.kernels.lora import BLOCK_M, LoRABatch, max_tiles, tile_layout
from ziggurat.models.staging import Staging

IDS, POSITIONS, SLOTS, SEQ_LENS, ROWS = range(5)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_batch: int, max_model_len: int, table_width: int,
                 staging: Staging, lora_slots: int = 0):
        """lora_slots: the model's LoRA slot count (0: no LoRA inputs)."""
        self.model, self.device, self.max_model_len = model, device, max_model_len
        self.lora_slots = lora_slots
        self.buckets = bucket_sizes(max_batch)
        n = self.max_batch = self.buckets[-1]
        self.tokens = torch.zeros(5, n, dtype=torch.long, device=device)
        self.tokens[SLOTS].fill_(-1)
        self.block_tables = torch.zeros(n, table_width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=device)
        self.lora = torch.full((self._lora_len(n),), -1, dtype=torch.long, device=device) if lora_slots else None
        self.staging = staging
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # LoRA engines: per bucket, a graph of the base model alone, for steps without adapters.
        self.base_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.base_outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def _lora_len(self, bs: int) -> int:
        t = max_tiles(bs, self.lora_slots)
        return bs + t * BLOCK_M + t

    def _lora_batch(self, bs: int) -> LoRABatch | None:
        """Views of the static LoRA buffer for bucket bs."""
        if self.lora is None:
            return None
        t = max_tiles(bs, self.lora_slots)
        tiles = bs + t * BLOCK_M
        return LoRABatch(self.lora[:bs], self.lora[bs:tiles], self.lora[tiles : tiles + t])

    def _forward(self, bs: int, meta: AttentionMetadata, with_lora: bool = True):
        args = (self.tokens[IDS, :bs], self.tokens[POSITIONS, :bs], meta)
        lora = self._lora_batch(bs) if with_lora else None
        return self.model(*args, lora) if lora is not None else self.model(*args)

    def bucket(self, b: int) -> int:
        return next(s for s in self.buckets if s >= b)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.tokens[SLOTS, :bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.tokens[SEQ_LENS, :bs],
            block_tables=self.block_tables[:bs],
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[self.max_model_len] * bs,
            max_query_len=1,
            max_seq_len=self.max_model_len,  # sizes the decode grid for any length
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        kinds = [(True, self.graphs, self.outputs)]
        if self.lora is not None:
            kinds.append((False, self.base_graphs, self.base_outputs))
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            for with_lora, graphs, outputs in kinds:
                self._forward(bs, meta, with_lora)  # compiles any kernel this shape needs, outside the capture
                torch.cuda.synchronize(self.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    outputs[bs] = self._forward(bs, meta, with_lora)
                pool = g.pool()
                graphs[bs] = g
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0

    def run(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
            rows: np.ndarray, table: torch.Tensor, feedback=None, lora_slots: np.ndarray | None = None) -> torch.Tensor:
        """One decode step of b = len(ids) sequences -> hidden states [b, hidden].
        `table` is the persistent GPU block table; `rows` index it. feedback =
        (token indices, ids), on the device, overrides those input ids (tokens
        sampled by the step still in flight). lora_slots: each sequence's LoRA slot
        (-1 none), or None when no sequence has an adapter."""
        b = len(ids)
        bs = self.bucket(b)
        host = self.staging.buffer(self.tokens.numel())[: self.tokens.numel()].view(5, -1)
        h = host.numpy()
        h[IDS, :b], h[POSITIONS, :b], h[SLOTS, :b], h[SEQ_LENS, :b], h[ROWS, :b] = ids, positions, slots, seq_lens, rows
        h[:, b:bs] = 0
        h[SLOTS, b:bs] = -1
        self.staging.copy_to(self.tokens, host)
        if feedback is not None:
            self.tokens[IDS].index_copy_(0, *feedback)
        torch.index_select(table, 0, self.tokens[ROWS, :bs], out=self.block_tables[:bs])
        base = self.lora is None or lora_slots is None  # no adapter in this step: the base model alone
        if not base:
            self._fill_lora(bs, lora_slots)
        graphs, outputs = (self.base_graphs, self.base_outputs) if self.lora is not None and base else \
            (self.graphs, self.outputs)
        if bs not in graphs:  # never captured (CPU tests): same buffers, eager forward
            return self._forward(bs, self._meta(bs), not base)[:b]
        graphs[bs].replay()
        return outputs[bs][:b]

    def _fill_lora(self, bs: int, lora_slots: np.ndarray) -> None:
        n = self._lora_len(bs)
        host = self.staging.buffer(n)[:n]
        h = host.numpy()
        h[:bs] = -1
        h[: len(lora_slots)] = lora_slots
        t = max_tiles(bs, self.lora_slots)
        h[bs : bs + t * BLOCK_M], h[bs + t * BLOCK_M :] = tile_layout(h[:bs], self.lora_slots, t)
        self.staging.copy_to(self.lora[:n], host)
