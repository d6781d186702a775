"""y = x W^T (+ b) with W in FP8 (e4m3) and a per-output-channel scale: which path, and the references.

    W ~= weight.float() * weight_scale[:, None]        weight [N, K] float8_e4m3fn, weight_scale [N] fp32

Two numerics, chosen by the number of rows M (ZIGGURAT_FP8_GEMM):

    weight-only (W8A16)  M <= FP8_GEMV_MAX_M (decode): activations stay in 16 bits; the Triton
                         GEMV (kernels/fp8_triton.py) streams the fp8 weights (half the bytes of
                         bf16) and applies the scale in registers, fp32 accumulation.
    W8A8                 larger M (prefill): activations quantized to e4m3 per token (absmax /
                         448, a Triton kernel) or with the checkpoint's static input_scale, then
                         torch._scaled_mm on the FP8 tensor cores with row-wise scales.

ZIGGURAT_FP8_GEMM=auto (default) as above; `scaled_mm`: W8A8 at every M (A/B
of the decode GEMV); `dequant`: weight-only at every M (the "dequantized
weights" numerics: the reference of the fp8 weights alone).

Off the Triton path (ZIGGURAT_KERNELS=torch, CPU tensors by default) the same
numerics run as torch references: dequantize, then an fp32 matmul; W8A8 first
rounds the activations exactly as the quantization kernel does. So an FP8
model computes the same function on every device, up to summation order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ziggurat.kernels.activation import silu_and_mul
from ziggurat.kernels.backend import env_choice, use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
MIN_SCALE = 1e-12  # scales never go below this: an all-zero row or token divides by it, not by 0
FP8_GEMV_MAX_M = 2  # as kernels/matmul.py's GEMV_MAX_M: beyond it the tensor cores win
GEMM_MODES = ("auto", "scaled_mm", "dequant")


def gemm_mode() -> str:
    return env_choice("ZIGGURAT_FP8_GEMM", GEMM_MODES)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, b: torch.Tensor | None = None,
               x_scale: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x [..., K] (16/32-bit), w [N, K] fp8, w_scale [N] fp32, x_scale: static [1] or None (per token).
    gated: x is [..., 2K] and the input is silu_and_mul(x) (the fp8 GEMV's prologue, else computed first)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    mode = gemm_mode()
    w8a8 = mode == "scaled_mm" or mode == "auto" and x2.shape[0] > FP8_GEMV_MAX_M
    if use_triton(x2):
        from ziggurat.kernels import fp8_triton

        if not w8a8 and x2.shape[0] <= fp8_triton.MAX_M:
            return fp8_triton.fp8_gemv(x2, w, w_scale, b, gated=gated).reshape(*shape[:-1], w.shape[0])
    if gated:  # the fp8 GEMV's prologue applies the activation; every other path takes it first
        x2 = silu_and_mul(x2)
    if use_triton(x2) and w8a8 and _scaled_mm_fits(x2, w):
        return _scaled_mm(x2, w, w_scale, b, x_scale).reshape(*shape[:-1], w.shape[0])
    y = fp8_linear_ref(x2, w, w_scale, b, x_scale, w8a8)
    return y.reshape(*shape[:-1], w.shape[0])


def _scaled_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._scaled_mm: K and N multiples of 16; on CUDA, FP8 tensor cores (sm_89+)."""
    if x.shape[1] % 16 or w.shape[0] % 16 or x.stride(1) != 1 or not w.is_contiguous():
        return False
    return not x.is_cuda or _fp8_tensor_cores(x.device.index)


@functools.cache
def _fp8_tensor_cores(device_index) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _scaled_mm(x, w, w_scale, b, x_scale):
    from ziggurat.kernels.fp8_triton import quantize_per_token

    xq, xs = quantize_per_token(x, x_scale)
    # Row-wise scaling takes bf16 output on CUDA; other dtypes are cast from it.
    out = torch.bfloat16 if x.is_cuda else x.dtype
    bias = b if b is not None and b.dtype == out else None
    y = torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=w_scale.view(1, -1), bias=bias, out_dtype=out)
    if b is not None and bias is None:
        y = y + b.to(out)
    return y if y.dtype == x.dtype else y.to(x.dtype)


# -- references -------------------------------------------------------------------


def quantize_per_token_ref(x: torch.Tensor, x_scale: torch.Tensor | None = None):
    """x [M, K] -> (fp8 [M, K], fp32 scales [M, 1]); x ~= q * scale. Per token: scale =
    max(absmax(row), MIN_SCALE * 448) / 448; static: the given scale for every row."""
    xf = x.float()
    if x_scale is None:
        scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    else:
        scale = x_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.contiguous()


def fp8_linear_ref(x, w, w_scale, b=None, x_scale=None, w8a8: bool = False) -> torch.Tensor:
    """Dequantize, then an fp32 matmul; w8a8 first rounds x as the quantization kernel does."""
    if w8a8:
        xq, xs = quantize_per_token_ref(x, x_scale)
        xf = xq.float() * xs
    else:
        xf = x.float()
    y = F.linear(xf, w.float() * w_scale.float().reshape(-1, 1), None if b is None else b.float())
    return y.to(x.dtype)
