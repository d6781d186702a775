"""Triton kernels of batched LoRA (kernels/lora.py defines the op and the tile layout).

Two launches per projection: shrink (tmp = x A_s^T, fp32) and expand
(y += tmp B_s^T, in y's dtype). Both grids depend only on the token count
(the CUDA-graph bucket) and the layer's shape, never on the slot count:
each program walks a strided share of the tiles and skips unused ones
(slot -1; tile_layout packs the used tiles first), so 32 resident slots cost
a few scalar loads per program, not thousands of programs that exit at once.

    groups G   = min(n_tiles, max(ceil(T / 16), 8))   program g takes tiles g, g + G, g + 2G, ...
                 (a decode batch whose tokens all have adapters needs >= ceil(T / 16) tiles)
    shrink     grid (G, r_blocks, splits): one share of tiles x one block of A's rows (all
               sub-modules fused, <= 64) x one part of the input (split-K for decode, where
               G is small), in BLOCK_K steps -> tmp [splits, T, n_sub * r]
    expand     grid (G, col_groups): one share of tiles x one run of blocks_per consecutive
               BLOCK_N-column blocks. Per tile, tmp's splits are summed once (fixed order:
               deterministic) for each sub-module the run's columns lie in, then each block
               (one sub-module each) reads its B rows and y, and writes y. Every (token,
               column) has one writer: no atomics.

The split count and col_groups aim at `programs` programs a launch (about
two per SM on an H200), with >= k_per_split input columns per shrink
program; a prefill's many tiles (G = T / 16) need few splits (2 at 2,048
tokens, none from 4,096) and give each program one tile and many column
blocks. Choice by shape, on the host.

Why not one launch: the expand needs each tile's complete tmp; recomputing it
per column program multiplies A's reads by col_groups, and reducing the
splits inside the launch needs a grid barrier or a ticket counter (not
worth its risk at these sizes). Why the splits are summed in the expand: a
tile's partials are 16 x n_sub*r fp32 (1-3 KB a split at rank 16), read
from L2 once per (program, tile, sub-module its columns reach), not once
per column block as before.

Cost at Llama-3.1-8B's decode (T = 128 tokens, 8 adapters of 16 tokens each,
32 slots, rank 16, bf16; n_tiles = max_tiles = 40, 8 used; defaults):

    proj     in     out    shrink grid    expand grid   HBM bytes (A+x | B+y r/w)   at 4 TB/s
    qkv      4096   6144   8x1x8 = 64     8x24 = 192    3.1+1.0 | 1.6+3.1 MB          2.2 us
    o        4096   4096   8x1x8 = 64     8x32 = 256    1.0+1.0 | 1.0+2.1 MB          1.3 us
    gate_up  4096  28672   8x1x8 = 64     8x32 = 256    2.1+1.0 | 7.3+14.7 MB         6.3 us
    down    14336   4096   8x1x16 = 128   8x32 = 256    3.7+3.7 | 1.0+2.1 MB          2.6 us

A shrink program: one tile (16 tokens) x 512 input columns (896 for down) in
4 (7) steps of [16 x 128] x [128 x 16..64] (A's rows of all sub-modules, 48
for qkv), its loads software-pipelined (cp.async). An expand program: per
tile, the 8 (down: 16) split partials of the sub-module its columns lie in
(rarely two; 8-16 KB from L2), then 1-7 blocks of 128 columns (qkv 2, o 1,
gate_up 7, down 1), each [16 x 16] x [16 x 128] with 4 KB of B and 4 KB of
y in, 4 KB out. The partials' L2 traffic is 1.6-4.2 MB a projection (~10 MB
a layer, 1-2 us at L2 speed; the configs trade it against the programs). So ~12.5 us of HBM bytes a layer plus 8 launches at ~3 us: ~36 us a
layer, ~1.2 ms a 32-layer step (was ~170 us a layer, 5.4 ms a step, with
40 x N/64 expand programs: 17,920 for gate_up alone). The step: ~8.25 +
1.2 ms against 8.25 ms, ~0.88x. With 32 adapters (4 tokens a tile, 32 tiles
used) each program takes 4 tiles and the adapters' bytes grow 4x: ~52 us a
layer, ~1.7 ms a step. The y round trip of gate_up (14.7 MB, 3.7 us) is the
floor of a separate op; folding the expand into the base matmul's epilogue
would remove it. `python -m ziggurat.scripts.bench_lora_kernels --plan`
prints these grids and estimates for any config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ziggurat.kernels.lora import BLOCK_M, LoRABatch

# Triton's interpreter mis-computes bf16 dots: under it the kernels dot in fp32 (loads and stores keep
# the tensors' dtypes), so CPU tests cover bf16 tensors too.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Launch shapes (scripts/bench_lora_kernels.py --configs sweeps them on a GPU)."""

    programs: int = 256  # programs a launch to aim at (~2 per SM of an H200's 132)
    min_groups: int = 8  # tile groups at least (small batches of many adapters: tiles of 1-2 tokens)
    block_n: int = 128  # expand: output columns a block at most (the largest power of two dividing the sub-modules)
    block_k: int = 128  # shrink: input columns a step
    k_per_split: int = 512  # shrink: input columns a program at least
    max_splits: int = 16
    num_warps: int = 4
    groups: int | None = None  # force the tile groups (tests: programs that loop over many tiles)
    splits: int | None = None  # force the shrink's input splits


DEFAULT = LoRAKernelConfig()


@dataclass(frozen=True)
class Plan:
    """One call's grids, from the shapes alone (the same for every batch of a CUDA-graph bucket)."""

    groups: int
    r_blocks: int
    block_r: int
    splits: int
    per_split: int  # input columns a split, a multiple of block_k
    block_n: int
    col_groups: int
    blocks_per: int  # expand: consecutive column blocks a program

    @property
    def shrink_grid(self) -> tuple[int, int, int]:
        return self.groups, self.r_blocks, self.splits

    @property
    def expand_grid(self) -> tuple[int, int]:
        return self.groups, self.col_groups


def _block_n(sub_sizes: tuple[int, ...], cap: int) -> int | None:
    """The widest block (16 .. cap, a power of two) that divides every sub-module but the last:
    each block then lies in one sub-module."""
    bn = triton.next_power_of_2(cap)
    while bn > cap:
        bn //= 2
    while bn >= 16:
        if all(s % bn == 0 for s in sub_sizes[:-1]):
            return bn
        bn //= 2
    return None


def plan(num_tokens: int, k: int, sub_sizes: tuple[int, ...], rank: int, n_tiles: int,
         config: LoRAKernelConfig = DEFAULT) -> Plan | None:
    """The grids for x [num_tokens, k] and a layer of `sub_sizes` outputs at `rank`; None for widths no
    block of 16+ columns fits."""
    bn = _block_n(sub_sizes, config.block_n)
    if bn is None or n_tiles == 0:
        return None
    groups = min(n_tiles, config.groups or max(triton.cdiv(num_tokens, BLOCK_M), config.min_groups))
    r_all = len(sub_sizes) * rank
    block_r = min(64, max(16, triton.next_power_of_2(r_all)))
    r_blocks = triton.cdiv(r_all, block_r)
    splits = config.splits or max(1, min(config.programs // (groups * r_blocks), config.max_splits,
                                         k // config.k_per_split))
    per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    n_blocks = triton.cdiv(sum(sub_sizes), bn)
    col_groups = max(1, min(n_blocks, triton.cdiv(config.programs, groups)))
    blocks_per = triton.cdiv(n_blocks, col_groups)
    return Plan(groups, r_blocks, block_r, triton.cdiv(k, per_split), per_split, bn,
                triton.cdiv(n_blocks, blocks_per), blocks_per)


@triton.jit
def _dot(p, q, F32: tl.constexpr):
    if F32:
        out = tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(p, q)
    return out


@triton.jit
def _tile_tokens(tile_tokens_ptr, tile, offs_m, BLOCK_M: tl.constexpr):
    """A tile's token indices (padding -1 read as token 0) and which of them are real."""
    tok = tl.load(tile_tokens_ptr + tile * BLOCK_M + offs_m)
    mmask = tok >= 0
    return tl.where(mmask, tok, 0), mmask


@triton.jit
def _shrink(x_ptr, a_ptr, tmp_ptr, tile_tokens_ptr, tile_slots_ptr, n_tiles, K, R, K_PER_SPLIT, stride_xm,
            stride_as, stride_ar, stride_ts, stride_tm, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_K: tl.constexpr, F32: tl.constexpr):
    groups = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    split = tl.program_id(2)
    k_start = split * K_PER_SPLIT
    for tile in range(tl.program_id(0), n_tiles, groups):
        slot = tl.load(tile_slots_ptr + tile)
        if slot >= 0:
            tok, mmask = _tile_tokens(tile_tokens_ptr, tile, offs_m, BLOCK_M)
            a_base = a_ptr + slot.to(tl.int64) * stride_as
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < K
                xt = tl.load(x_ptr + tok[:, None] * stride_xm + offs_k[None, :],
                             mask=mmask[:, None] & kmask[None, :], other=0.0)
                at = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :],
                             mask=rmask[:, None] & kmask[None, :], other=0.0)
                acc += _dot(xt, tl.trans(at), F32)
            tl.store(tmp_ptr + split * stride_ts + tok[:, None] * stride_tm + offs_r[None, :], acc,
                     mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _sum_splits(tmp_ptr, tok, mmask, col0, RANK, stride_ts, stride_tm, BLOCK_R: tl.constexpr,
                SPLITS: tl.constexpr):
    """tmp[:, tok, col0 : col0 + RANK] summed over the splits in order: [BLOCK_M, BLOCK_R] fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = tmp_ptr + tok[:, None] * stride_tm + col0 + offs_r[None, :]
    mask = mmask[:, None] & (offs_r < RANK)[None, :]
    t = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLITS):
        t += tl.load(ptrs + s * stride_ts, mask=mask, other=0.0)
    return t


@triton.jit
def _expand(tmp_ptr, b_ptr, y_ptr, tile_tokens_ptr, tile_slots_ptr, n_tiles, N, RANK, off1, off2, BLOCKS_PER,
            stride_ts, stride_tm, stride_bs, stride_bn, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_R: tl.constexpr, N_SUB: tl.constexpr, SPLITS: tl.constexpr, F32: tl.constexpr):
    groups = tl.num_programs(0)
    nb0 = tl.program_id(1) * BLOCKS_PER
    nb1 = tl.minimum(nb0 + BLOCKS_PER, tl.cdiv(N, BLOCK_N))
    # BLOCK_N divides every sub-module's width (the wrapper checks): one sub-module a block
    first = (nb0 * BLOCK_N >= off1).to(tl.int32) + (nb0 * BLOCK_N >= off2).to(tl.int32)
    last = ((nb1 - 1) * BLOCK_N >= off1).to(tl.int32) + ((nb1 - 1) * BLOCK_N >= off2).to(tl.int32)
    dt = b_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < RANK
    for tile in range(tl.program_id(0), n_tiles, groups):
        slot = tl.load(tile_slots_ptr + tile)
        if slot >= 0:
            tok, mmask = _tile_tokens(tile_tokens_ptr, tile, offs_m, BLOCK_M)
            b_base = b_ptr + slot.to(tl.int64) * stride_bs
            # tmp of each sub-module first..last once per tile, in the dot's dtype
            t0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=dt)
            t1 = t0
            t2 = t0
            if first == 0:
                t0 = _sum_splits(tmp_ptr, tok, mmask, 0, RANK, stride_ts, stride_tm, BLOCK_R, SPLITS).to(dt)
            if N_SUB > 1:
                if (first <= 1) & (last >= 1):
                    t1 = _sum_splits(tmp_ptr, tok, mmask, RANK, RANK, stride_ts, stride_tm, BLOCK_R, SPLITS).to(dt)
            if N_SUB > 2:
                if last == 2:
                    t2 = _sum_splits(tmp_ptr, tok, mmask, 2 * RANK, RANK, stride_ts, stride_tm, BLOCK_R,
                                     SPLITS).to(dt)
            for nb in range(nb0, nb1):
                n0 = nb * BLOCK_N
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < N
                t = t0
                if N_SUB > 1:
                    sub = (n0 >= off1).to(tl.int32) + (n0 >= off2).to(tl.int32)
                    t = tl.where(sub == 0, t0, tl.where(sub == 1, t1, t2))
                b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :],
                            mask=nmask[:, None] & rmask[None, :], other=0.0)
                acc = _dot(t, tl.trans(b), F32)
                yp = y_ptr + tok[:, None] * stride_ym + offs_n[None, :]
                m2 = mmask[:, None] & nmask[None, :]
                y = tl.load(yp, mask=m2, other=0.0)
                tl.store(yp, (y.to(tl.float32) + acc).to(y.dtype), mask=m2)


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sub_sizes: tuple[int, ...],
             batch: LoRABatch, config: LoRAKernelConfig = DEFAULT) -> bool:
    """The op of kernels/lora.py::add_lora. False (nothing done) for a shape these kernels
    do not take (more than 3 sub-modules, or a sub-module width no block of 16+ columns divides)."""
    t, k = x.shape
    s, r_all, _ = a.shape
    n, rank = b.shape[1], b.shape[2]
    n_tiles = batch.tile_slots.shape[0]
    p = plan(t, k, sub_sizes, rank, n_tiles, config)
    if p is None or len(sub_sizes) > 3 or t == 0:
        return False
    if x.stride(1) != 1 or y.stride(1) != 1 or not a.is_contiguous() or not b.is_contiguous():
        raise ValueError("add_lora: x and y need unit column stride, a and b must be contiguous")
    if y.shape != (t, n) or a.shape[2] != k or b.shape[0] != s or r_all != len(sub_sizes) * rank or sum(sub_sizes) != n:
        raise ValueError(f"add_lora: shapes x {tuple(x.shape)}, y {tuple(y.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, sub_sizes {sub_sizes} do not agree")
    if batch.tile_tokens.shape[0] != n_tiles * BLOCK_M:
        raise ValueError("add_lora: tile_tokens must hold BLOCK_M entries per tile")
    f32 = x.dtype == torch.float32 or _INTERPRETED
    tmp = torch.empty(p.splits, t, r_all, dtype=torch.float32, device=x.device)
    _shrink[p.shrink_grid](
        x, a, tmp, batch.tile_tokens, batch.tile_slots, n_tiles, k, r_all, p.per_split, x.stride(0), a.stride(0),
        a.stride(1), tmp.stride(0), tmp.stride(1), BLOCK_M=BLOCK_M, BLOCK_R=p.block_r, BLOCK_K=config.block_k,
        F32=f32, num_warps=config.num_warps)
    offs = [sum(sub_sizes[: i + 1]) for i in range(len(sub_sizes) - 1)] + [n, n]
    _expand[p.expand_grid](
        tmp, b, y, batch.tile_tokens, batch.tile_slots, n_tiles, n, rank, offs[0], offs[1], p.blocks_per, tmp.stride(0),
        tmp.stride(1), b.stride(0), b.stride(1), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=p.block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), N_SUB=len(sub_sizes), SPLITS=p.splits, F32=f32,
        num_warps=config.num_warps)
    return True
