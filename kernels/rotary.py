"""Rotary position embedding, "rotate half" (GPT-NeoX) layout as HF Llama uses.

cos_sin_cache: [max_positions, rotary_dim] float32, cos in the first half of
the last dim, sin in the second; row p holds position p.
"""

from __future__ import annotations

import torch

from ziggurat.kernels.backend import use_triton


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hk, D], positions: [T]. Returns rotated (q, k)."""
    if use_triton(q):
        from ziggurat.kernels.elementwise_triton import apply_rotary as triton_rotary

        return triton_rotary(q, k, positions, cos_sin_cache)
    return apply_rotary_ref(q, k, positions, cos_sin_cache)


def apply_rotary_ref(q, k, positions, cos_sin_cache):
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
