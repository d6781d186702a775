"""Writing new keys and values into the paged KV cache.

Layout of one layer's cache (k and v alike):

    cache[num_blocks, block_size, num_kv_heads, head_dim]
    slot s  ->  block s // block_size, offset s % block_size

slot_mapping[t] is the slot of token t; -1 marks a padding token to skip.
"""

from __future__ import annotations

import torch

from ziggurat.kernels.backend import use_triton
from ziggurat.kernels.rotary import apply_rotary_ref


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [T, num_kv_heads, head_dim]."""
    if use_triton(k):
        from ziggurat.kernels.elementwise_triton import store_kv as triton_store_kv

        return triton_store_kv(k, v, k_cache, v_cache, slot_mapping)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    nb, bs, h, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k fused with the KV store: returns the rotated
    (q, k) and writes the rotated k and v into their slots. One kernel per
    layer instead of three (rotate q, rotate k, store), which counts at batch 1
    where each launch costs as much as its work."""
    if use_triton(q):
        from ziggurat.kernels.elementwise_triton import rotary_store_kv as triton_rotary_store_kv

        return triton_rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    return rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


def rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping):
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k
