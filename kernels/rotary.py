"""Rotary position embedding, "rotate half" (GPT-NeoX) layout as HF Llama uses.

cos_sin_cache: [max_positions, rotary_dim] float32, cos in the first half of
the last dim, sin in the second; row p holds position p.

The model applies it fused with the KV store (kernels/kv_cache.py::
rotary_store_kv, one Triton kernel per layer); this is the reference.
"""

from __future__ import annotations

import torch


def apply_rotary_ref(q, k, positions, cos_sin_cache):
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
