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


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """A kernel switch read from the environment: one of `choices`, the first when unset; any
    other value is a ValueError naming the variable. The one reader of every ZIGGURAT_* kernel
    switch (ZIGGURAT_KERNELS, _GEMV, _FP8_GEMM, _DECODE_MERGE, _MIXED_DECODE, _FRESH_PREFILL)."""
    mode = os.environ.get(name, choices[0])
    if mode not in choices:
        raise ValueError(f"{name}: must be one of {list(choices)}, got {mode!r}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    mode = env_choice("ZIGGURAT_KERNELS", ("auto", "torch", "triton"))
    if mode == "torch":
        return False
    if mode == "triton":
        return _triton_available()
    return t.is_cuda and _triton_available()
