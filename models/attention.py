"""The attention layer: rotate q/k, store this step's keys/values, attend over the paged cache.

The runner binds each layer's cache tensors once (`bind_kv_cache`); per-step
state arrives as an explicit AttentionMetadata argument, never a global.
"""

from __future__ import annotations

import torch
from torch import nn

from ziggurat.kernels.attention import AttentionMetadata, paged_attention
from ziggurat.kernels.kv_cache import rotary_store_kv, store_kv


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None,
                 rotary: nn.Module | None = None):
        super().__init__()
        self.rotary = rotary  # RotaryEmbedding (shared table) applied with the store in one kernel
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # An FP8 cache's 0-d fp32 scales (parameters: the checkpoint may carry them; models/quantization.py).
        self.k_scale = self.v_scale = None

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, positions, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D] or [T, Hq*D], k/v: [T, Hkv, D] or [T, Hkv*D] -> [T, Hq*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            q, k = rotary_store_kv(q, k, v, positions, self.rotary.cos_sin_cache, self.k_cache, self.v_cache,
                                   meta.slot_mapping, self.k_scale, self.v_scale)
        else:
            store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window, k, v,
                              self.k_scale, self.v_scale)
        return out.reshape(t, self.num_heads * self.head_dim)
