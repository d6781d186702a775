"""Which implementation a kernel-shaped op runs: the Triton kernel or the torch reference.

ZIGGURAT_KERNELS=auto (default): Triton on CUDA tensors when Triton imports,
the torch reference otherwise. `torch` forces the reference everywhere;
`triton` forces the Triton kernels (on a CPU that means Triton's
interpreter, TRITON_INTERPRET=1: slow, for tests).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        from ziggurat.kernels.interpret import patch_interpreter

        patch_interpreter()
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("ZIGGURAT_KERNELS", "auto")
    if mode == "torch":
        return False
    if mode == "triton":
        return _triton_available()
    return t.is_cuda and _triton_available()
