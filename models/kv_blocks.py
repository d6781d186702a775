"""KV export and import: a request's blocks out of one rank's cache and into another's.

A rank's KV cache is two tensors per attention layer (kernels/kv_cache.py):

    k_cache[layer], v_cache[layer]: [num_blocks, block_size, local_kv_heads, head_dim]

A transfer moves a list of source blocks into a list of destination blocks
(the same count), for a range of KV heads: with tensor parallelism each rank
holds a slice of the heads (models/linear.py: QKVParallelLinear), and two
replicas of different TP sizes hold different slices, so the heads are
re-sharded on the way (`head_plan`). The packed form, what travels between
processes, is one contiguous tensor [layers, 2 (k, v), blocks, block_size,
heads, head_dim].

Plain torch here (the CPU path and the reference); on CUDA, the copy between
two ranks on one host is one Triton launch over all layers
(kernels/kv_copy_triton.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_heads_of(rank: int, tp_size: int, num_kv_heads: int) -> tuple[int, int]:
    """The global KV heads [lo, hi) that TP rank `rank` of `tp_size` holds
    (with fewer heads than ranks, heads are replicated: rank r holds head
    r // (tp_size // num_kv_heads))."""
    if num_kv_heads >= tp_size:
        n = num_kv_heads // tp_size
        return rank * n, (rank + 1) * n
    h = rank // (tp_size // num_kv_heads)
    return h, h + 1


@dataclass(frozen=True)
class HeadSlice:
    """One piece of a destination rank's heads, found on one source rank."""

    src_rank: int
    src_lo: int  # local head offsets in the source rank's cache
    dst_lo: int  # and in the destination rank's
    num_heads: int


def head_plan(dst_rank: int, dst_tp: int, src_tp: int, num_kv_heads: int) -> list[HeadSlice]:
    """Where destination rank `dst_rank` finds each of its KV heads among the source ranks."""
    lo, hi = kv_heads_of(dst_rank, dst_tp, num_kv_heads)
    out: list[HeadSlice] = []
    h = lo
    while h < hi:
        src = next(r for r in range(src_tp) if kv_heads_of(r, src_tp, num_kv_heads)[0] <= h
                   < kv_heads_of(r, src_tp, num_kv_heads)[1])
        s_lo, s_hi = kv_heads_of(src, src_tp, num_kv_heads)
        n = min(hi, s_hi) - h
        out.append(HeadSlice(src, h - s_lo, h - lo, n))
        h += n
    return out


def cache_tensors(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k_cache, v_cache) of every attention layer, in layer order."""
    out = []
    for attn in model.attention_layers():
        if attn.k_cache is None:
            raise RuntimeError("the KV cache is not allocated")
        out.append((attn.k_cache, attn.v_cache))
    return out


def gather_blocks(caches, block_ids: list[int], head_lo: int = 0, num_heads: int | None = None) -> torch.Tensor:
    """Pack blocks (and a head range) of every layer: [L, 2, nb, bs, heads, D], contiguous."""
    k0 = caches[0][0]
    h = k0.shape[2] - head_lo if num_heads is None else num_heads
    idx = torch.as_tensor(block_ids, dtype=torch.long, device=k0.device)
    out = torch.empty((len(caches), 2, len(block_ids), k0.shape[1], h, k0.shape[3]), dtype=k0.dtype, device=k0.device)
    for i, (k, v) in enumerate(caches):
        out[i, 0] = k.index_select(0, idx)[:, :, head_lo:head_lo + h]
        out[i, 1] = v.index_select(0, idx)[:, :, head_lo:head_lo + h]
    return out


def scatter_blocks(caches, packed: torch.Tensor, block_ids: list[int], head_lo: int = 0) -> None:
    """Write a packed tensor (gather_blocks) into blocks `block_ids` at heads [head_lo, head_lo + its heads)."""
    if packed.shape[0] != len(caches) or packed.shape[2] != len(block_ids):
        raise ValueError(f"packed KV of shape {tuple(packed.shape)} does not fit {len(caches)} layers x "
                         f"{len(block_ids)} blocks")
    k0 = caches[0][0]
    h = packed.shape[4]
    idx = torch.as_tensor(block_ids, dtype=torch.long, device=k0.device)
    packed = packed.to(k0.device)
    for i, (k, v) in enumerate(caches):
        if head_lo == 0 and h == k.shape[2]:
            k.index_copy_(0, idx, packed[i, 0])
            v.index_copy_(0, idx, packed[i, 1])
        else:
            k[:, :, head_lo:head_lo + h].index_copy_(0, idx, packed[i, 0])
            v[:, :, head_lo:head_lo + h].index_copy_(0, idx, packed[i, 1])


def copy_blocks(src_caches, dst_caches, src_ids: list[int], dst_ids: list[int], sl: HeadSlice) -> None:
    """Copy blocks between two sets of caches the caller can address (one process,
    or a peer's caches mapped through CUDA IPC); torch reference of kv_copy_triton."""
    if not src_ids:
        return
    k0 = dst_caches[0][0]
    if k0.is_cuda and len(src_caches) == len(dst_caches):
        from ziggurat.kernels.backend import use_triton

        if use_triton(k0):
            from ziggurat.kernels.kv_copy_triton import copy_blocks as triton_copy

            return triton_copy(src_caches, dst_caches, src_ids, dst_ids, sl.src_lo, sl.dst_lo, sl.num_heads)
    packed = gather_blocks(src_caches, src_ids, sl.src_lo, sl.num_heads)
    scatter_blocks(dst_caches, packed, dst_ids, sl.dst_lo)


def block_bytes(caches, num_heads: int | None = None) -> int:
    """Bytes of one block over all layers (k and v), for `num_heads` heads (default: all local ones)."""
    k0 = caches[0][0]
    h = k0.shape[2] if num_heads is None else num_heads
    return 2 * len(caches) * k0.shape[1] * h * k0.shape[3] * k0.element_size()
