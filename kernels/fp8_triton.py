"""Triton kernels of the FP8 linear layers: per-token activation quantization and the fp8-weight GEMV.

quantize_per_token: program m owns token row m. Pass 1 walks the row in
BLOCK chunks for its absmax (skipped with a static scale), pass 2 writes
round(x / scale) as e4m3 (clamped to +-448, so the cast never overflows).
Reference: kernels/fp8.py::quantize_per_token_ref (same fp32 operations, so
the same bytes).

fp8_gemv: kernels/gemv_triton.py's kernel (program p owns BLOCK_N output features,
walks K in BLOCK_K chunks, fp32 accumulator, no split-K) with HAS_SCALE: the weight
tile is read as fp8 (half the bytes of bf16: decode streams weights, so the
step is twice as short at the copy rate) and widened in registers; the
channel scale multiplies the finished dot product once per output, which
equals dequantizing each weight first. Reference: kernels/fp8.py::fp8_linear_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ziggurat.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE
from ziggurat.kernels.gemv_triton import _gemv_kernel


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, stride_q, min_scale,
                  STATIC: tl.constexpr, BLOCK: tl.constexpr, FMAX: tl.constexpr):
    m = tl.program_id(0)
    x_row = x_ptr + m.to(tl.int64) * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / FMAX, min_scale)
    q_row = q_ptr + m.to(tl.int64) * stride_q
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FMAX), FMAX)
        tl.store(q_row + k, q.to(tl.float8e4nv), mask=k < K)
    tl.store(s_ptr + m, scale)


def quantize_per_token(x: torch.Tensor, x_scale: torch.Tensor | None = None, block: int = 1024):
    """x [M, K] (rows contiguous) -> (fp8 [M, K], fp32 scales [M, 1]); x_scale: a static [1] scale."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_per_token: x must be [M, K] with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _quant_kernel[(m,)](x, q, s, x_scale if x_scale is not None else s, k, x.stride(0), q.stride(0), MIN_SCALE,
                            STATIC=x_scale is not None, BLOCK=min(block, triton.next_power_of_2(k)), FMAX=FP8_MAX)
    return q, s


# (block_n, block_k, num_warps, num_stages) by weight shape (N, K). An fp8 tile of
# BLOCK_K bytes per row is half a bf16 one, so the default reads twice the K of
# gemv_triton's for the same bytes in flight; scripts/bench_fp8.py --gemv-sweep
# measures the candidates on a GPU and prints the best per shape for this table.
DEFAULT_CONFIG = (4, 2048, 4, 3)
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {}
MAX_M = 8


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, b: torch.Tensor | None = None,
             config=None, gated: bool = False) -> torch.Tensor:
    """x [M, K] (M <= 8, rows contiguous), w [N, K] fp8 contiguous, w_scale [N] fp32 -> [M, N] in x's dtype.
    gated: x is [M, 2K] (gate columns, then up) and the product is silu_and_mul(x) w^T (gemv_triton's GATED)."""
    m, kx = x.shape
    n, k = w.shape
    if m > MAX_M or kx != (2 * k if gated else k) or not w.is_contiguous() or x.stride(1) != 1 or w.dtype != FP8:
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)} and w {tuple(w.shape)} {w.dtype} do not fit "
                         f"(M <= {MAX_M}, contiguous K, fp8 weights{', x twice as wide as w: gated' if gated else ''})")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"fp8_gemv: w_scale must be float32 [{n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config or CONFIGS.get((n, k), DEFAULT_CONFIG)
    bk = min(bk, max(16, triton.next_power_of_2(k)))
    _gemv_kernel[(triton.cdiv(n, bn),)](  # the bf16 GEMV's kernel, scaling each output channel
        x, w, w_scale, b if b is not None else w_scale, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        HAS_SCALE=True, HAS_BIAS=b is not None, BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=bn, BLOCK_K=bk,
        GATED=gated, num_warps=warps, num_stages=stages)
    return out
