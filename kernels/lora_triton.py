"""Triton kernels of batched LoRA (kernels/lora.py defines the op and the layouts).

shrink: one program per (tile, block of rank columns, split of the input): the
        tile's BLOCK_M tokens (all of one slot) times that slot's A over its
        part of the input, in BLOCK_K steps -> tmp [SPLIT_K, T, n_sub * r] (fp32).
        A decode batch has few tiles, so the input is split (SPLIT_K programs
        per tile) to spread A's bytes over more SMs.
expand: one program per (tile, block of output columns): tmp's sub-module
        columns summed over the splits (in a fixed order: deterministic) times
        the slot's B, added into y. Every token is in exactly one tile, so
        each y element has one writer (no atomics).

Programs of unused tiles (tile slot -1) return at once; the grid depends only
on the tile count and the layer's shape, so CUDA graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ziggurat.kernels.lora import BLOCK_M, LoRABatch


@triton.jit
def _shrink(x_ptr, a_ptr, tmp_ptr, tile_tokens_ptr, tile_slots_ptr, K, R, K_PER_SPLIT, stride_xm, stride_as,
            stride_ar, stride_ts, stride_tm, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
            IEEE: tl.constexpr):
    tile = tl.program_id(0)
    slot = tl.load(tile_slots_ptr + tile)
    if slot < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    tok = tl.load(tile_tokens_ptr + tile * BLOCK_M + offs_m)
    mmask = tok >= 0
    tok = tl.where(mmask, tok, 0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    split = tl.program_id(2)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        xt = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :], mask=mmask[:, None] & kmask[None, :],
                     other=0.0)
        at = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                     other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at))
    tl.store(tmp_ptr + split * stride_ts + tok[:, None] * stride_tm + offs_r[None, :], acc,
             mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _expand(tmp_ptr, b_ptr, y_ptr, tile_tokens_ptr, tile_slots_ptr, N, RANK, off1, off2, stride_ts, stride_tm,
            stride_bs, stride_bn, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
            SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    slot = tl.load(tile_slots_ptr + tile)
    if slot < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    tok = tl.load(tile_tokens_ptr + tile * BLOCK_M + offs_m)
    mmask = tok >= 0
    tok = tl.where(mmask, tok, 0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    # BLOCK_N divides every sub-module's width (the wrapper checks): one sub per block.
    sub = (n0 >= off1).to(tl.int32) + (n0 >= off2).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < RANK
    t_ptrs = tmp_ptr + tok[:, None] * stride_tm + sub * RANK + offs_r[None, :]
    tmask = mmask[:, None] & rmask[None, :]
    t = tl.load(t_ptrs, mask=tmask, other=0.0)
    for s in range(1, SPLIT_K):
        t += tl.load(t_ptrs + s * stride_ts, mask=tmask, other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=nmask[:, None] & rmask[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(t.to(b.dtype), tl.trans(b), input_precision="ieee")
    else:
        acc = tl.dot(t.to(b.dtype), tl.trans(b))
    yp = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
    m2 = mmask[:, None] & nmask[None, :]
    y = tl.load(yp, mask=m2, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc).to(y.dtype), mask=m2)


def _block_n(sub_sizes: tuple[int, ...]) -> int | None:
    for bn in (64, 32, 16):
        if all(s % bn == 0 for s in sub_sizes[:-1]):
            return bn
    return None


def split_k(n_tiles: int, k: int) -> int:
    """Input splits of the shrink: a decode batch's few tiles get up to 8 programs each (>= 512
    input columns apiece); a prefill's many tiles fill the GPU without."""
    if n_tiles > 64:
        return 1
    return max(1, min(8, k // 512))


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sub_sizes: tuple[int, ...],
             batch: LoRABatch, splits: int | None = None) -> bool:
    """The op of kernels/lora.py::add_lora. False (nothing done) for a shape these kernels
    do not take (a sub-module width that no block of 16+ columns divides). splits: the
    shrink's input splits (default: split_k)."""
    t, k = x.shape
    s, r_all, _ = a.shape
    n, rank = b.shape[1], b.shape[2]
    bn = _block_n(sub_sizes)
    if bn is None or len(sub_sizes) > 3 or t == 0:
        return False
    if x.stride(1) != 1 or y.stride(1) != 1 or not a.is_contiguous() or not b.is_contiguous():
        raise ValueError("add_lora: x and y need unit column stride, a and b must be contiguous")
    if y.shape != (t, n) or a.shape[2] != k or b.shape[0] != s or r_all != len(sub_sizes) * rank or sum(sub_sizes) != n:
        raise ValueError(f"add_lora: shapes x {tuple(x.shape)}, y {tuple(y.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, sub_sizes {sub_sizes} do not agree")
    n_tiles = batch.tile_slots.shape[0]
    if batch.tile_tokens.shape[0] != n_tiles * BLOCK_M:
        raise ValueError("add_lora: tile_tokens must hold BLOCK_M entries per tile")
    ieee = x.dtype == torch.float32
    block_k = 64
    splits = splits or split_k(n_tiles, k)
    per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, per_split)
    tmp = torch.empty(splits, t, r_all, dtype=torch.float32, device=x.device)
    block_r = min(64, max(16, triton.next_power_of_2(r_all)))
    _shrink[(n_tiles, triton.cdiv(r_all, block_r), splits)](
        x, a, tmp, batch.tile_tokens, batch.tile_slots, k, r_all, per_split, x.stride(0), a.stride(0), a.stride(1),
        tmp.stride(0), tmp.stride(1), BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k, IEEE=ieee)
    offs = [sum(sub_sizes[: i + 1]) for i in range(len(sub_sizes) - 1)] + [n, n]
    _expand[(n_tiles, triton.cdiv(n, bn))](
        tmp, b, y, batch.tile_tokens, batch.tile_slots, n, rank, offs[0], offs[1], tmp.stride(0), tmp.stride(1),
        b.stride(0), b.stride(1), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=bn,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), SPLIT_K=splits, IEEE=ieee)
    return True
