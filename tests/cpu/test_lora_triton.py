"""The batched-LoRA Triton kernels against the torch reference, through Triton's interpreter on a CPU
(tests/gpu/ would cover large shapes on a GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
triton = pytest.importorskip("triton")

from ziggurat.kernels.interpret import patch_interpreter  # noqa: E402

patch_interpreter()
from ziggurat.kernels import lora as L  # noqa: E402
from ziggurat.kernels import lora_triton as LT  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def case(t, k, sub_sizes, rank, slots, seed, dtype=torch.float32, none_share=0.25, ranks=None):
    """x, y, stacked A/B (zero-padded above each adapter's own rank), and token slots."""
    g = torch.Generator().manual_seed(seed)
    n_sub, out = len(sub_sizes), sum(sub_sizes)
    a = torch.randn(slots, n_sub * rank, k, generator=g)
    b = torch.randn(slots, out, rank, generator=g)
    for s, r in enumerate(ranks or [rank] * slots):  # an adapter of a lower rank: zeros past it
        for i in range(n_sub):
            a[s, i * rank + r : (i + 1) * rank] = 0
        b[s, :, r:] = 0
    x = torch.randn(t, k, generator=g)
    y = torch.randn(t, out, generator=g)
    rng = np.random.default_rng(seed)
    token_slots = np.where(rng.random(t) < none_share, -1, rng.integers(0, slots, t))
    cast = dict(dtype=dtype, device=DEV)
    return x.to(**cast), y.to(**cast), a.to(**cast), b.to(**cast), token_slots


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("sub_sizes", [(64,), (96, 32), (64, 32, 32)])
@pytest.mark.parametrize("t,k,splits", [(1, 48, 1), (7, 200, 3), (40, 48, 1), (40, 300, 2)])
def test_kernel_matches_reference(rank, sub_sizes, t, k, splits):
    """Ranks 8/16/64 (adapters of lower rank zero-padded), fused sub-modules, several adapters and
    tokens without one; the shrink's input in one part or split (a width no block divides)."""
    x, y, a, b, slots = case(t, k, sub_sizes, rank, slots=4, seed=rank + t + len(sub_sizes),
                             ranks=[rank, max(1, rank // 2), rank, 1])
    batch = L.lora_batch(slots, 4, torch.device(DEV))
    ref, out = y.clone(), y.clone()
    L.add_lora_ref(ref, x, a, b, sub_sizes, batch)
    assert LT.add_lora(out, x, a, b, sub_sizes, batch, splits=splits)
    none = torch.from_numpy(slots < 0).to(DEV)
    assert torch.equal(out[none], y[none])  # tokens without an adapter untouched
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    if (slots >= 0).any():
        assert not torch.allclose(ref, y)


def test_split_heuristic():
    assert LT.split_k(n_tiles=40, k=4096) == 8 and LT.split_k(40, 14336) == 8 and LT.split_k(40, 64) == 1
    assert LT.split_k(n_tiles=1100, k=4096) == 1  # a prefill's tiles fill the GPU


def test_graph_shaped_batch_with_padding_tiles_and_rows():
    """As a CUDA graph runs it: tiles for the worst case (max_tiles), padding tokens (-1) past the
    batch, one adapter holding most tokens; then no adapter at all (every tile unused)."""
    x, y, a, b, _ = case(32, 64, (64, 32, 32), 16, slots=3, seed=9)
    slots = np.full(32, -1)
    slots[:20] = [0] * 17 + [2, 2, 1]  # 17 tokens of slot 0 take two tiles
    tokens, tiles = L.tile_layout(slots, 3, L.max_tiles(32, 3))
    assert len(tiles) == 2 + 3 and list(tiles[:4]) == [0, 0, 1, 2] and tiles[4] == -1
    assert sorted(tokens[tokens >= 0].tolist()) == list(range(20))
    t = lambda v: torch.from_numpy(v).to(DEV)  # noqa: E731
    batch = L.LoRABatch(t(slots), t(tokens), t(tiles))
    ref, out = y.clone(), y.clone()
    L.add_lora_ref(ref, x, a, b, (64, 32, 32), batch)
    assert LT.add_lora(out, x, a, b, (64, 32, 32), batch)
    assert (out - ref).abs().max().item() <= 1e-3 and torch.equal(out[20:], y[20:])
    tokens, tiles = L.tile_layout(np.full(32, -1), 3, L.max_tiles(32, 3))
    idle = y.clone()
    assert LT.add_lora(idle, x, a, b, (64, 32, 32), L.LoRABatch(t(np.full(32, -1)), t(tokens), t(tiles)))
    assert torch.equal(idle, y)


@pytest.mark.skipif(DEV != "cuda", reason="Triton's interpreter mis-computes bfloat16 dots (as for the other kernels)")
def test_bfloat16_close_to_reference():
    x, y, a, b, slots = case(24, 64, (64, 64), 16, slots=2, seed=3, dtype=torch.bfloat16)
    batch = L.lora_batch(slots, 2, torch.device(DEV))
    ref, out = y.float().clone(), y.clone()
    L.add_lora_ref(ref, x.float(), a.float(), b.float(), (64, 64), batch)
    assert LT.add_lora(out, x, a, b, (64, 64), batch)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_widths_no_block_divides_fall_back():
    x, y, a, b, slots = case(4, 16, (24, 8), 8, slots=1, seed=1)
    assert not LT.add_lora(y, x, a, b, (24, 8), L.lora_batch(slots, 1, torch.device(DEV)))
