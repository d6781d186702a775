"""A skinny matmul for decode: y[M, N] = x[M, K] W[N, K]^T (+ b) with M <= 8.

At batch 1 a decode step is a chain of matrix-vector products that only
stream the weights, so the kernel's one job is to keep enough loads in
flight to run at the copy rate. Program p owns BLOCK_N output features and
walks K in BLOCK_K chunks: each row chunk is a contiguous read, every x
chunk is reused by all BLOCK_N rows, and the accumulator stays in fp32
registers. No split-K (no second pass, no atomics): BLOCK_N is small enough
that the grid fills the GPU several times over.

GATED (the MLP's down projection at decode) folds SwiGLU's activation into
the prologue: x is the merged gate_up output [M, 2K] and each x chunk is
silu(x[:, k]) * x[:, K + k], computed by elementwise_triton.silu_mul (the
silu_and_mul kernel's own code, so the same bits), instead of a separate
silu_and_mul launch and its [M, K] round trip through memory. Every program
recomputes the activation of the chunks it reads (M * K exps per program: at
the 8B's down shape and M = 1, by a rough count a quarter of an H200's SFU
throughput while the weights stream at the copy rate), which should cost less
than the launch it saves: not yet measured on a GPU (bench_gpu --profile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ziggurat.kernels.elementwise_triton import silu_mul


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GATED: tl.constexpr):
    # HAS_SCALE: w is FP8 with a per-output-channel fp32 scale at s_ptr (kernels/fp8_triton.py)
    # GATED: x is a merged gate_up output [M, 2K]; the vector is silu(gate) * up (module docstring)
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # int64 offsets: N * K may pass 2^31 (a 405B model's LM head)
        x_at = x_ptr + m[:, None] * stride_xm + k[None, :]
        x_ok = m_ok[:, None] & k_ok[None, :]
        if GATED:  # masked lanes read 0 and 0: silu(0) * 0 = 0
            x = silu_mul(tl.load(x_at, mask=x_ok, other=0.0), tl.load(x_at + K, mask=x_ok, other=0.0))
        else:
            x = tl.load(x_at, mask=x_ok, other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# (block_n, block_k, num_warps, num_stages) by GPU and weight shape (N, K): the best of
# `bench_gemv --sweep` for Llama-3.1-8B's layers at TP=1, measured on each GPU (BENCHMARKS.md).
# None: cuBLAS streams that shape faster there (matmul.py uses it).
DEFAULT_CONFIG = (4, 1024, 4, 3)
TABLES: dict[str, dict[tuple[int, int], tuple[int, int, int, int] | None]] = {
    "H100": {  # 2026-11-24
        (6144, 4096): (16, 1024, 4, 1),  # qkv
        (4096, 4096): (4, 1024, 4, 3),  # o
        (28672, 4096): (4, 1024, 4, 3),  # gate_up
        (4096, 14336): (4, 1024, 4, 1),  # down
        (128256, 4096): (4, 1024, 4, 2),  # lm_head
    },
    "H200": {  # 2026-12-01, M = 1: Triton / cuBLAS GB/s of the best config
        (6144, 4096): None,  # qkv: 2,251 / 2,258
        (4096, 4096): (4, 1024, 4, 2),  # o: 1,947 / 1,764
        (28672, 4096): None,  # gate_up: 3,387 / 3,415
        (4096, 14336): (4, 1024, 4, 3),  # down: 2,859 / 2,818
        (128256, 4096): (16, 1024, 4, 2),  # lm_head: 4,280 / 4,220
    },
}
_tables: dict[int, dict] = {}  # device index -> its table


def table_for(device: torch.device) -> dict:
    """The config table of this GPU (by name: "NVIDIA H200" -> H200; unknown GPUs get the
    H100's, the nearest measured); shapes not listed use DEFAULT_CONFIG."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    t = _tables.get(idx)
    if t is None:
        name = torch.cuda.get_device_name(idx)
        t = _tables[idx] = next((v for k, v in TABLES.items() if k in name), TABLES["H100"])
    return t


def config_for(device: torch.device, n: int, k: int) -> tuple[int, int, int, int] | None:
    """The launch config for an (N, K) weight on this GPU; None where cuBLAS wins."""
    return table_for(device).get((n, k), DEFAULT_CONFIG)


MAX_M = 8


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, config=None,
         gated: bool = False) -> torch.Tensor:
    """x: [M, K] (M <= 8, rows contiguous), w: [N, K] contiguous -> [M, N] in x's dtype.
    gated: x is [M, 2K] (gate columns, then up) and the product is silu_and_mul(x) w^T."""
    m, kx = x.shape
    n, k = w.shape
    if m > MAX_M or kx != (2 * k if gated else k) or w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit (M <= {MAX_M}, contiguous K"
                         f"{', x twice as wide as w: gated' if gated else ''})")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = config or (config_for(x.device, n, k) if x.is_cuda else None) or DEFAULT_CONFIG
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, w, w, b if b is not None else w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        HAS_SCALE=False, HAS_BIAS=b is not None, BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=bn, BLOCK_K=bk,
        GATED=gated, num_warps=warps, num_stages=stages)
    return out
