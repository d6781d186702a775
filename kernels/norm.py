"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch

from ziggurat.kernels.backend import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from ziggurat.kernels.elementwise_triton import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Matches HF: normalise in fp32, cast back, then scale by the weight.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    if use_triton(x):
        from ziggurat.kernels.elementwise_triton import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual
