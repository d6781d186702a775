"""Block copy between two ranks' KV caches on one host: all layers, k and v, one launch.

The caches may belong to another process (mapped through CUDA IPC:
topology/kv_transport.py), so the kernel takes tables of raw addresses, one
per (layer, k|v) tensor, and the block ids to copy. One program copies one
block of one tensor: block_size rows of `num_heads * head_dim` contiguous
elements (a head range of each row: the re-sharding between TP sizes).
Reference: models/kv_blocks.py (gather_blocks + scatter_blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _copy_kernel(src_tab, dst_tab, src_ids, dst_ids, nblocks,
                 src_row, dst_row, src_off, dst_off,
                 BS: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, DTYPE: tl.constexpr,
                 WHOLE: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // nblocks  # which (layer, k|v) tensor
    j = pid % nblocks
    src = tl.load(src_tab + t).to(tl.pointer_type(DTYPE))
    dst = tl.load(dst_tab + t).to(tl.pointer_type(DTYPE))
    sb = tl.load(src_ids + j).to(tl.int64)
    db = tl.load(dst_ids + j).to(tl.int64)
    if WHOLE:  # every head on both sides: the block is BS * N contiguous elements
        i = tl.arange(0, CHUNK)
        for c in tl.static_range(BS * N // CHUNK):
            x = tl.load(src + sb * (BS * N) + c * CHUNK + i)
            tl.store(dst + db * (BS * N) + c * CHUNK + i, x)
    else:  # a head range of each row
        i = tl.arange(0, N_PAD)
        ok = i < N
        for r in tl.static_range(BS):
            x = tl.load(src + (sb * BS + r) * src_row + src_off + i, mask=ok)
            tl.store(dst + (db * BS + r) * dst_row + dst_off + i, x, mask=ok)


def address_table(caches, device) -> torch.Tensor:
    """[2L] int64 addresses of every layer's k then v cache, in layer order."""
    return torch.tensor([t.data_ptr() for kv in caches for t in kv], dtype=torch.int64, device=device)


def copy_blocks(src_caches, dst_caches, src_ids, dst_ids, src_head_lo: int, dst_head_lo: int, num_heads: int,
                src_table: torch.Tensor | None = None, dst_table: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> None:
    """Copy blocks src_ids -> dst_ids of every layer, heads [src_head_lo, +num_heads) of the
    source into [dst_head_lo, ...) of the destination, on the current stream.
    Tables (address_table) may be passed in to save their upload, and `ids`
    (src_ids then dst_ids, int32, on the device) to save theirs."""
    k_src, k_dst = src_caches[0][0], dst_caches[0][0]
    if k_src.dtype != k_dst.dtype or k_src.shape[1] != k_dst.shape[1] or k_src.shape[3] != k_dst.shape[3]:
        raise ValueError(f"KV caches do not match: {tuple(k_src.shape)} {k_src.dtype} vs "
                         f"{tuple(k_dst.shape)} {k_dst.dtype}")
    for kv in (*src_caches, *dst_caches):
        for t in kv:
            if not t.is_contiguous():
                raise ValueError("KV caches must be contiguous")
    n = len(src_ids)
    if n == 0:
        return
    dev = k_dst.device
    bs, d = k_dst.shape[1], k_dst.shape[3]
    if ids is None:  # one upload for both lists, from pinned memory (torch caches pinned blocks), not waited for
        ids = torch.tensor(list(src_ids) + list(dst_ids), dtype=torch.int32,
                           pin_memory=dev.type == "cuda").to(dev, non_blocking=True)
    sid, did = ids[:n], ids[n:2 * n]
    st = address_table(src_caches, dev) if src_table is None else src_table
    dt = address_table(dst_caches, dev) if dst_table is None else dst_table
    width = num_heads * d
    whole = num_heads == k_src.shape[2] == k_dst.shape[2] and (bs * width) % 2048 == 0
    grid = (st.numel() * n,)
    _copy_kernel[grid](st, dt, sid, did, n, k_src.shape[2] * d, k_dst.shape[2] * d, src_head_lo * d,
                       dst_head_lo * d, BS=bs, N=width, N_PAD=triton.next_power_of_2(width), DTYPE=_TL[k_dst.dtype],
                       WHOLE=whole, CHUNK=2048, num_warps=8 if whole else 4)
