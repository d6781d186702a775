"""SwiGLU's activation: silu(gate) * up over the merged gate_up projection.

x is [T, 2 * I] (gate columns, then up columns), the output [T, I]. The
Triton kernel reads x once and writes the product once; the reference runs
silu and the multiply as two torch ops. Both round like HF transformers
(silu's result in the input dtype, then the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ziggurat.kernels.backend import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from ziggurat.kernels.elementwise_triton import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    return silu_and_mul_ref(x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
