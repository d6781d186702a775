"""Batched LoRA: y += (x A_s^T) B_s^T for each token's adapter slot s, many adapters per batch.

Each LoRA-capable layer keeps every resident adapter's weights stacked in
fixed slots (models/lora.py), zero-padded to the replica's max rank r and
with the adapter's scaling folded into B:

    A [S, n_sub * r, in]     sub-module i's A in rows i*r .. i*r + r_i (zeros after r_i)
    B [S, out, r]            sub-module i's B in its output rows (the fused layer's
                             q | k | v or gate | up), columns 0 .. r_i

A fused layer has n_sub sub-modules (qkv: 3, gate_up: 2, others 1) whose
output columns are `sub_sizes`; output column n of sub i reads only
tmp[:, i*r : (i+1)*r], so B is stored compactly (not block-diagonal).

The batch (LoRABatch) tags each token with its slot (-1: no adapter) and, for
the Triton kernels, groups the tokens by slot into tiles of BLOCK_M (the
SGMV idea: each adapter's weights are read once per tile, not per token):

    tile_tokens [n_tiles * BLOCK_M]   token indices, slot by slot, each slot's run
                                      padded with -1 to a whole tile
    tile_slots  [n_tiles]             the slot of each tile; -1: unused (early exit)

n_tiles is fixed by the token count and the slot count (max_tiles), never by
the batch's content, so a captured CUDA graph replays for any mix of adapters:
only the buffers' values change. Two kernels: shrink (tmp = x A^T, fp32) and
expand (y += tmp B^T, in y's dtype). The torch reference loops over the slots
present (it reads token_slots on the host: a sync on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ziggurat.kernels.backend import use_triton

BLOCK_M = 16  # tokens per tile (tl.dot's smallest M)


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [T] int64: each token's slot, -1 for none
    tile_tokens: torch.Tensor  # [n_tiles * BLOCK_M] int64
    tile_slots: torch.Tensor  # [n_tiles] int64


def max_tiles(num_tokens: int, num_slots: int) -> int:
    """Tiles that any assignment of num_tokens tokens to num_slots slots can need."""
    return -(-num_tokens // BLOCK_M) + min(num_slots, num_tokens)


def tile_layout(token_slots: np.ndarray, num_slots: int, num_tiles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tile_tokens, tile_slots) for token_slots (host arrays), padded to num_tiles
    (default: max_tiles(len(token_slots), num_slots))."""
    t = len(token_slots)
    n_tiles = max_tiles(t, num_slots) if num_tiles is None else num_tiles
    tokens = np.full(n_tiles * BLOCK_M, -1, dtype=np.int64)
    tiles = np.full(n_tiles, -1, dtype=np.int64)
    has = token_slots >= 0
    if not has.any():
        return tokens, tiles
    order = np.flatnonzero(has)[np.argsort(token_slots[has], kind="stable")]
    slots_sorted = token_slots[order]
    present, first, counts = np.unique(slots_sorted, return_index=True, return_counts=True)
    ntile = -(-counts // BLOCK_M)
    tile_start = np.zeros(len(present) + 1, dtype=np.int64)
    np.cumsum(ntile, out=tile_start[1:])
    if tile_start[-1] > n_tiles:
        raise ValueError(f"{tile_start[-1]} LoRA tiles needed, {n_tiles} available")
    tiles[: tile_start[-1]] = np.repeat(present, ntile)
    # token j of slot run k goes to tile_start[k] * BLOCK_M + j
    run = np.repeat(np.arange(len(present)), counts)
    within = np.arange(len(order)) - first[run]
    tokens[tile_start[run] * BLOCK_M + within] = order
    return tokens, tiles


def lora_batch(token_slots: np.ndarray, num_slots: int, device: torch.device, staging=None) -> LoRABatch:
    """A LoRABatch on `device` for host token_slots (one upload through `staging` when given)."""
    tokens, tiles = tile_layout(token_slots, num_slots)
    arrays = (token_slots.astype(np.int64, copy=False), tokens, tiles)
    if staging is not None:
        return LoRABatch(*staging.upload(*arrays))
    return LoRABatch(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays))


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sub_sizes: tuple[int, ...],
             batch: LoRABatch) -> None:
    """y[t] += (x[t] A_s^T) B_s^T in place, s = batch.token_slots[t] (tokens with -1 untouched).
    x [T, in], y [T, out], a [S, n_sub * r, in], b [S, out, r], sum(sub_sizes) == out."""
    if use_triton(x):
        from ziggurat.kernels.lora_triton import add_lora as triton_add_lora

        if triton_add_lora(y, x, a, b, sub_sizes, batch):
            return
    add_lora_ref(y, x, a, b, sub_sizes, batch)


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sub_sizes: tuple[int, ...],
                 batch: LoRABatch) -> None:
    r = b.shape[2]
    slots = batch.token_slots[: x.shape[0]]
    for s in torch.unique(slots[slots >= 0]).tolist():
        idx = torch.nonzero(slots == s).squeeze(1)
        tmp = x.index_select(0, idx) @ a[s].t()  # [n, n_sub * r]
        off = 0
        for i, size in enumerate(sub_sizes):
            y[idx, off : off + size] += tmp[:, i * r : (i + 1) * r] @ b[s, off : off + size].t()
            off += size
