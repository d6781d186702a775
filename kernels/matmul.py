"""y = x W^T (+ b) for the model's linear layers, and the MLP's down projection with its activation.

Skinny inputs (a decode step of one or two sequences) go to the Triton GEMV
(kernels/gemv_triton.py) with a launch config per GPU and weight shape,
where it beats cuBLAS on that GPU (its table, from scripts/bench_gemv.py
--sweep; BENCHMARKS.md): on an H100 5-10% faster at M <= 2 for every
Llama-3.1-8B layer; on an H200 for o, down and the LM head only. Every other shape, and
every non-CUDA tensor, is torch's (cuBLAS) matmul. FP8 weights (with their
scales: models/quantization.py) go to kernels/fp8.py.

gated=True takes the merged gate_up output [..., 2K] and computes
silu_and_mul(x) W^T: where the Triton GEMV (bf16 or FP8) runs, the activation
is the GEMV's prologue (one launch instead of two: gemv_triton's GATED);
everywhere else it is kernels/activation.py's silu_and_mul, then the matmul.
Both give the same numbers (the same rounding steps).

ZIGGURAT_GEMV (A/B runs): `triton` (default) as above; `unfused`: the same
GEMVs, with silu_and_mul as its own kernel; `cublas`: no Triton GEMV.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ziggurat.kernels.activation import silu_and_mul
from ziggurat.kernels.backend import env_choice, use_triton

GEMV_MAX_M = 2  # beyond this cuBLAS's tensor-core kernels win (bench_gemv: M=4 is 10-25% slower in Triton)
_GEMV_DTYPES = (torch.bfloat16, torch.float16)
GEMV_MODES = ("triton", "unfused", "cublas")


def gemv_mode() -> str:
    return env_choice("ZIGGURAT_GEMV", GEMV_MODES)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
           x_scale: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """w_scale / x_scale: an FP8 weight's per-channel scale and static input scale (else None).
    gated: x is [..., 2K] (gate columns, then up) and y = silu_and_mul(x) W^T (+ b)."""
    if gated and gemv_mode() == "unfused":
        x, gated = silu_and_mul(x), False
    if w_scale is not None:
        from ziggurat.kernels.fp8 import fp8_linear

        return fp8_linear(x, w, w_scale, b, x_scale, gated)
    config = _gemv_config(x, w)
    if config is not None:
        from ziggurat.kernels.gemv_triton import gemv

        return gemv(x, w, b, config, gated)
    return F.linear(silu_and_mul(x) if gated else x, w, b)


def _gemv_config(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The Triton GEMV's launch config for x W^T, or None where torch's matmul runs it."""
    if not (x.dim() == 2 and x.shape[0] <= GEMV_MAX_M and x.dtype in _GEMV_DTYPES and w.is_contiguous()
            and x.stride(1) == 1 and use_triton(x) and gemv_mode() != "cublas"):
        return None
    from ziggurat.kernels.gemv_triton import DEFAULT_CONFIG, config_for

    if not x.is_cuda:  # the Triton interpreter (tests)
        return DEFAULT_CONFIG
    return config_for(x.device, w.shape[0], w.shape[1])  # None: cuBLAS streams this shape faster on this GPU
