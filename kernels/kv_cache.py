"""Writing new keys and values into the paged KV cache.

Layout of one layer's cache (k and v alike):

    cache[num_blocks, block_size, num_kv_heads, head_dim]
    slot s  ->  block s // block_size, offset s % block_size

slot_mapping[t] is the slot of token t; -1 marks a padding token to skip.

An FP8 (e4m3) cache stores round(x / scale), clamped to +-448, with one
fp32 scale per layer for k and one for v (0-d tensors: k_scale, v_scale);
the attention kernels multiply it back. 16-bit caches take no scales.
"""

from __future__ import annotations

import torch

from ziggurat.kernels.backend import use_triton
from ziggurat.kernels.fp8 import FP8, FP8_MAX
from ziggurat.kernels.rotary import apply_rotary_ref


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, num_kv_heads, head_dim]; k_scale / v_scale: an FP8 cache's scales."""
    if use_triton(k):
        from ziggurat.kernels.elementwise_triton import store_kv as triton_store_kv

        return triton_store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def to_cache(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x in the cache's dtype: an FP8 cache holds round(x / scale) (scale None: 1.0)."""
    if cache.dtype != FP8:
        return x.to(cache.dtype)
    xf = x.float() if scale is None else x.float() / scale.float()
    return xf.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    nb, bs, h, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    # index_copy_ has no fp8 kernel on every device: the bytes are copied as uint8.
    view = (lambda c: c.view(torch.uint8)) if k_cache.dtype == FP8 else (lambda c: c)
    view(k_cache).view(nb * bs, h, d).index_copy_(0, slot_mapping, view(to_cache(k, k_cache, k_scale)))
    view(v_cache).view(nb * bs, h, d).index_copy_(0, slot_mapping, view(to_cache(v, v_cache, v_scale)))


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k fused with the KV store: returns the rotated
    (q, k) and writes the rotated k and v into their slots. One kernel per
    layer instead of three (rotate q, rotate k, store), which counts at batch 1
    where each launch costs as much as its work."""
    if use_triton(q):
        from ziggurat.kernels.elementwise_triton import rotary_store_kv as triton_rotary_store_kv

        return triton_rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale,
                                      v_scale)
    return rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale=None,
                        v_scale=None):
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k
