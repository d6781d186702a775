"""RMSNorm module over the kernels/norm functions."""

from __future__ import annotations

import torch
from torch import nn

from ziggurat.kernels.norm import fused_add_rms_norm, rms_norm


def _load_replicated(param, src, shard_id=None) -> None:
    src.expect_shape(tuple(param.shape))
    param.data.copy_(src.read())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = _load_replicated
        self.weight.shard_ids = (None,)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With: (norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)
