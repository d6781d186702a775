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

_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
       torch.float8_e4m3fn: tl.float8e4nv}  # an FP8 KV cache (--kv-cache-dtype fp8)


@triton.jit
def _copy_kernel(src_tab, dst_tab, ids, cap, width,
                 src_row, dst_row, src_off, dst_off,
                 BS: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, DTYPE: tl.constexpr,
                 WHOLE: tl.constexpr, CHUNK: tl.constexpr):
    # ids: [n, src ids (cap), dst ids (cap)]; the grid is 2L * width (width >= n): programs
    # j >= n idle, so a fixed launch shape (width = cap, e.g. in a CUDA graph) serves any n.
    pid = tl.program_id(0)
    t = pid // width  # which (layer, k|v) tensor
    j = pid % width
    n = tl.load(ids)
    live = j < n
    src = tl.load(src_tab + t).to(tl.pointer_type(DTYPE))
    dst = tl.load(dst_tab + t).to(tl.pointer_type(DTYPE))
    jj = tl.where(live, j, 0)  # idle programs read slot 0 and store nothing
    sb = tl.load(ids + 1 + jj).to(tl.int64)
    db = tl.load(ids + 1 + cap + jj).to(tl.int64)
    if WHOLE:  # every head on both sides: the block is BS * N contiguous elements
        i = tl.arange(0, CHUNK)
        m = (i * 0 + j) < n
        for c in tl.static_range(BS * N // CHUNK):
            x = tl.load(src + sb * (BS * N) + c * CHUNK + i, mask=m)
            tl.store(dst + db * (BS * N) + c * CHUNK + i, x, mask=m)
    else:  # a head range of each row
        i = tl.arange(0, N_PAD)
        ok = (i < N) & ((i * 0 + j) < n)
        for r in tl.static_range(BS):
            x = tl.load(src + (sb * BS + r) * src_row + src_off + i, mask=ok)
            tl.store(dst + (db * BS + r) * dst_row + dst_off + i, x, mask=ok)


def address_table(caches, device) -> torch.Tensor:
    """[2L] int64 addresses of every layer's k then v cache, in layer order."""
    return torch.tensor([t.data_ptr() for kv in caches for t in kv], dtype=torch.int64, device=device)


def pack_ids(src_ids, dst_ids, cap: int, out=None):
    """The kernel's id buffer [n, src ids padded to cap, dst ids padded to cap] (int32, host)."""
    n = len(src_ids)
    if n > cap:
        raise ValueError(f"{n} blocks exceed the id buffer's capacity {cap}")
    buf = torch.zeros(1 + 2 * cap, dtype=torch.int32) if out is None else out
    a = buf.numpy()
    a[0] = n
    a[1 : 1 + n] = src_ids
    a[1 + cap : 1 + cap + n] = dst_ids
    return buf


def check_caches(src_caches, dst_caches) -> None:
    """Both sides' caches fit the kernel: same dtype, block size and head dim; contiguous."""
    k_src, k_dst = src_caches[0][0], dst_caches[0][0]
    if k_src.dtype != k_dst.dtype or k_src.shape[1] != k_dst.shape[1] or k_src.shape[3] != k_dst.shape[3]:
        raise ValueError(f"KV caches do not match: {tuple(k_src.shape)} {k_src.dtype} vs "
                         f"{tuple(k_dst.shape)} {k_dst.dtype}")
    for kv in (*src_caches, *dst_caches):
        for t in kv:
            if not t.is_contiguous():
                raise ValueError("KV caches must be contiguous")


def launch(src_caches, dst_caches, src_head_lo: int, dst_head_lo: int, num_heads: int,
           src_table: torch.Tensor, dst_table: torch.Tensor, ids: torch.Tensor, cap: int,
           width: int | None = None) -> None:
    """One launch over a packed id buffer of capacity `cap` already on the device (pack_ids),
    `width` (default cap) programs per tensor, at least the buffer's n. No checks (check_caches)."""
    k_src, k_dst = src_caches[0][0], dst_caches[0][0]
    bs, d = k_dst.shape[1], k_dst.shape[3]
    row = num_heads * d  # elements of one token's head range
    whole = num_heads == k_src.shape[2] == k_dst.shape[2] and (bs * row) % 2048 == 0
    programs = cap if width is None else width
    _copy_kernel[(src_table.numel() * programs,)](
        src_table, dst_table, ids, cap, programs, k_src.shape[2] * d, k_dst.shape[2] * d, src_head_lo * d,
        dst_head_lo * d, BS=bs, N=row, N_PAD=triton.next_power_of_2(row), DTYPE=_TL[k_dst.dtype], WHOLE=whole,
        CHUNK=2048,
        num_warps=8 if whole else 4)


def copy_blocks(src_caches, dst_caches, src_ids, dst_ids, src_head_lo: int, dst_head_lo: int, num_heads: int,
                src_table: torch.Tensor | None = None, dst_table: torch.Tensor | None = None) -> None:
    """Copy blocks src_ids -> dst_ids of every layer, heads [src_head_lo, +num_heads) of the
    source into [dst_head_lo, ...) of the destination, on the current stream.
    Tables (address_table) may be passed in to save their upload."""
    check_caches(src_caches, dst_caches)
    k_dst = dst_caches[0][0]
    n = len(src_ids)
    if n == 0:
        return
    dev = k_dst.device
    # One upload for both lists, from pinned memory (torch caches pinned blocks), not waited for.
    ids = pack_ids(src_ids, dst_ids, n, torch.empty(1 + 2 * n, dtype=torch.int32, pin_memory=dev.type == "cuda"))
    ids = ids.to(dev, non_blocking=True)
    st = address_table(src_caches, dev) if src_table is None else src_table
    dt = address_table(dst_caches, dev) if dst_table is None else dst_table
    launch(src_caches, dst_caches, src_head_lo, dst_head_lo, num_heads, st, dt, ids, n)
