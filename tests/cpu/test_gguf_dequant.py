"""Our GGUF dequantization against gguf-py's numpy reference, through a real .gguf file.

Each supported type is written with gguf.GGUFWriter, read back with
gguf.GGUFReader, and must match gguf.quants.dequantize bit for bit in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ziggurat.models.gguf_dequant import (
    GGML_TYPES,
    SUPPORTED,
    GGUFQuantError,
    dequantize,
    row_bytes,
    type_name,
)

gguf = pytest.importorskip("gguf")
GGML_QUANT_SIZES, T = gguf.GGML_QUANT_SIZES, gguf.GGMLQuantizationType

ROWS, COLS = 8, 512

# Types gguf.quants can quantize: random floats go through gguf's own quantizer.
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# Types it can only dequantize: random block bytes, with the fp16 scale fields (byte offsets) made finite.
RANDOM_BLOCKS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _fp16_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) bytes of finite fp16 values of both signs, from subnormal to ~1e2."""
    values = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-7, 2, n)
    return values.astype(np.float16).view(np.uint8).reshape(n, 2)


def _raw(name: str, rng: np.random.Generator) -> np.ndarray:
    qtype = T[name]
    if name in QUANTIZABLE:
        x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
        return gguf.quants.quantize(x, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (ROWS * COLS // block, size), dtype=np.uint8)
    for off in RANDOM_BLOCKS[name]:
        blocks[:, off:off + 2] = _fp16_bytes(rng, blocks.shape[0])
    return blocks.reshape(ROWS, -1)


@pytest.fixture(scope="module")
def gguf_tensors(tmp_path_factory):
    """name -> ReaderTensor for one tensor of every supported type, read back from a written .gguf file."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "quants.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name in sorted(SUPPORTED):
        raw = _raw(name, rng)
        raw_dtype = T[name] if raw.dtype == np.uint8 else None  # F32/F16 arrays carry their own type
        writer.add_tensor(f"t.{name}", raw, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    return {t.name.removeprefix("t."): t for t in reader.tensors}


def test_covers_the_expected_types():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= SUPPORTED
    assert SUPPORTED == set(QUANTIZABLE) | set(RANDOM_BLOCKS)


def test_type_table_matches_gguf():
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        if int(qtype) in GGML_TYPES:
            assert GGML_TYPES[int(qtype)] == (qtype.name, block, size)
    assert type_name(2) == "Q4_0" and type_name(99) == "type 99"


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_matches_gguf_reference(gguf_tensors, name):
    t = gguf_tensors[name]
    assert t.tensor_type == T[name]
    n_cols = int(t.shape[0])  # ggml order: ne0 (columns) first
    assert n_cols == COLS
    ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    ours = dequantize(t.tensor_type, t.data, n_cols, where=t.name)
    assert ours.shape == (ROWS, COLS) and ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, ref.reshape(ROWS, COLS))  # bitwise: same float32 operations in the same order
    # A flat torch uint8 tensor of the same bytes gives the same answer.
    flat = torch.from_numpy(np.array(t.data).reshape(-1).view(np.uint8))
    assert torch.equal(dequantize(int(t.tensor_type), flat, n_cols), ours)


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K", "F32"])
def test_dtype_is_a_cast_of_float32(gguf_tensors, name):
    t = gguf_tensors[name]
    f32 = dequantize(t.tensor_type, t.data, COLS)
    for dtype in (torch.bfloat16, torch.float16):
        out = dequantize(t.tensor_type, t.data, COLS, dtype=dtype)
        assert out.dtype == dtype and torch.equal(out, f32.to(dtype))


def test_f32_result_is_a_copy(gguf_tensors):
    t = gguf_tensors["F32"]
    out = dequantize(t.tensor_type, t.data, COLS)
    out.zero_()  # would crash on a read-only memmap view, or corrupt the reader's data
    assert np.array(t.data).any()


def test_unsupported_type_names_the_tensor():
    data = np.zeros((2, 66), dtype=np.uint8)
    with pytest.raises(GGUFQuantError, match=r"blk\.0\.attn_q\.weight.*IQ2_XXS.*supported: .*Q4_K"):
        dequantize(int(T.IQ2_XXS), data, 256, where="blk.0.attn_q.weight")
    with pytest.raises(GGUFQuantError, match="type 99"):
        dequantize(99, data, 256, where="w")


def test_bad_sizes_raise():
    assert row_bytes(int(T.Q4_0), 64) == 36
    assert row_bytes(int(T.Q6_K), 512) == 420
    assert row_bytes(int(T.F16), 7) == 14
    with pytest.raises(GGUFQuantError, match="multiple of 32"):
        row_bytes(int(T.Q4_0), 48)
    with pytest.raises(GGUFQuantError, match="multiple of 256"):
        row_bytes(int(T.Q4_K), 512 + 32)
    with pytest.raises(GGUFQuantError, match="'w': .*multiple of 256"):
        dequantize(int(T.Q4_K), np.zeros(144, dtype=np.uint8), 128, where="w")
    with pytest.raises(GGUFQuantError, match="whole number"):
        dequantize(int(T.Q4_0), np.zeros(18 * 3, dtype=np.uint8), 64)
