"""Dequantization of GGUF (ggml) tensor data into torch tensors.

`dequantize(ggml_type, data, n_cols)` turns the raw little-endian bytes of one
GGUF tensor -- ggml's blocks of packed quants plus fp16 scales, one row after
another -- into a (rows, n_cols) tensor. Everything is vectorized torch over
all blocks at once, computed in float32 in the same operation order as
gguf-py's numpy reference (so the results are bitwise equal), then cast.
No dependency on gguf-py: the type ids and block sizes are ggml's, restated here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch


class GGUFQuantError(ValueError):
    """A GGUF tensor we cannot dequantize: unsupported type or malformed size."""


QK_K = 256  # elements in a K-quant super block

# ggml type id -> (name, elements per block, bytes per block), as in ggml.h / gguf-py constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
    15: ("Q8_K", QK_K, 292),
    16: ("IQ2_XXS", QK_K, 66),
    17: ("IQ2_XS", QK_K, 74),
    18: ("IQ3_XXS", QK_K, 98),
    19: ("IQ1_S", QK_K, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", QK_K, 110),
    22: ("IQ2_S", QK_K, 82),
    23: ("IQ4_XS", QK_K, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", QK_K, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", QK_K, 54),
    35: ("TQ2_0", QK_K, 66),
    39: ("MXFP4", 32, 17),
}


def type_name(ggml_type: int) -> str:
    entry = GGML_TYPES.get(int(ggml_type))
    return entry[0] if entry else f"type {int(ggml_type)}"


def row_bytes(ggml_type: int, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements of `ggml_type`."""
    entry = GGML_TYPES.get(int(ggml_type))
    if entry is None:
        raise GGUFQuantError(f"unknown GGUF tensor type {type_name(ggml_type)}")
    name, block, size = entry
    if n_cols <= 0 or n_cols % block:
        raise GGUFQuantError(f"{name} rows must be a positive multiple of {block} elements, got {n_cols}")
    return n_cols // block * size


# --- per-type block decoders: (n_blocks, bytes per block) uint8 -> (n_blocks, elements per block) float32 ---

def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian fp16 bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k): low nibbles, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(qh: torch.Tensor, width: int) -> torch.Tensor:
    """(..., k) bytes -> (..., 8 // width, k): field i holds bits [i*width, (i+1)*width) of each byte."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(-1, 1)
    return (qh.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _low_bits32(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j at position j."""
    return _bits(qh, 1).transpose(1, 2).reshape(qh.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:]).reshape(-1, 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).reshape(-1, 32).float()
    return d * q + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 6:]).reshape(-1, 32) | (_low_bits32(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]).reshape(-1, 32) | (_low_bits32(b[:, 4:8]) << 4)
    return d * q.float() + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, 0:2])
    return b[:, 2:].view(torch.int8).float() * d


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit (scale, min) pairs -> two (n, 8) uint8.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and
    mins 4-7 take their low 4 bits from bytes 8-11 and their top 2 from the top
    bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo_sc & 0x3F, (hi & 0x0F) | ((lo_sc >> 2) & 0x30)), dim=1)
    mn = torch.cat((lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)), dim=1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.float()).view(n, 8, 1)
    offset = (dmin * mn.float()).view(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()  # sub-block 2i low, 2i+1 high nibbles
    return (scale * q - offset).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.float()).view(n, 8, 1)
    offset = (dmin * mn.float()).view(n, 8, 1)
    high = _bits(b[:, 16:48], 1)  # (n, 8, 32): bit j of byte l is element l of sub-block j
    q = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32) | (high << 4)
    return (scale * q.float() - offset).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, QK_K)  # per 128-half: 64 low, then 64 high nibbles
    high = _bits(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, QK_K)  # per half: 4 x 32 two-bit fields
    scales = b[:, 192:208].view(torch.int8).float()
    d = _f16(b[:, 208:210])
    q = ((low | (high << 4)).to(torch.int8) - 32).float().view(n, 16, 16)
    return ((d * scales).view(n, 16, 1) * q).reshape(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


_DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": lambda b: b.contiguous().view(torch.float32),
    "F16": lambda b: b.contiguous().view(torch.float16).float(),
    "BF16": _bf16,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
SUPPORTED = frozenset(_DECODERS)


def _as_bytes(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Any array/tensor (e.g. a GGUFReader memmap) -> flat uint8 tensor over the same bytes."""
    if isinstance(data, torch.Tensor):
        return data.contiguous().view(-1).view(torch.uint8)
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # read-only memmaps: we only ever read from the result
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(flat)


def dequantize(ggml_type: int, data: np.ndarray | torch.Tensor, n_cols: int, dtype: torch.dtype = torch.float32,
               where: str = "") -> torch.Tensor:
    """Raw GGUF tensor bytes ((rows, row_bytes) or flat) of `ggml_type` -> a new (rows, n_cols) tensor in `dtype`."""
    name = type_name(ggml_type)
    label = f"tensor {where!r}: " if where else ""
    decode = _DECODERS.get(name)
    if decode is None:
        raise GGUFQuantError(f"{label}GGUF type {name} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
    try:
        per_row = row_bytes(ggml_type, n_cols)
    except GGUFQuantError as e:
        raise GGUFQuantError(f"{label}{e}") from None
    raw = _as_bytes(data)
    if raw.numel() % per_row:
        raise GGUFQuantError(f"{label}{raw.numel()} bytes is not a whole number of {name} rows of {n_cols} "
                             f"({per_row} bytes each)")
    _, _, block_bytes = GGML_TYPES[int(ggml_type)]
    values = decode(raw.view(-1, block_bytes)).reshape(raw.numel() // per_row, n_cols)
    return values.to(dtype, copy=name == "F32")  # F32 decodes to a view of `data`: always copy it
