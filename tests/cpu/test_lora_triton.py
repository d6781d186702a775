"""The batched-LoRA Triton kernels against the torch reference, through Triton's interpreter on a CPU
(tests/gpu/ would cover large shapes on a GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kernel_cases import DEV, interpreted_triton

triton = interpreted_triton()

from ziggurat.kernels import lora as L  # noqa: E402
from ziggurat.kernels import lora_triton as LT  # noqa: E402



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
    """Ranks 8/16/64 (adapters of lower rank zero-padded; 3 x 64 rows of A: three row blocks), fused
    sub-modules, several adapters and tokens without one; the shrink's input in one part or split
    (a width no block divides)."""
    x, y, a, b, slots = case(t, k, sub_sizes, rank, slots=4, seed=rank + t + len(sub_sizes),
                             ranks=[rank, max(1, rank // 2), rank, 1])
    check(x, y, a, b, sub_sizes, slots, 4, LT.LoRAKernelConfig(splits=splits))


def check(x, y, a, b, sub_sizes, slots, num_slots, config, num_tiles=None, tol=1e-4):
    """The kernels against the reference on one batch: tokens without an adapter untouched (bit for
    bit), the others within tol (relative to the output's largest value)."""
    tokens, tiles = L.tile_layout(slots, num_slots, num_tiles)
    dev = lambda v: torch.from_numpy(np.ascontiguousarray(v)).to(DEV)  # noqa: E731
    batch = L.LoRABatch(dev(slots.astype(np.int64)), dev(tokens), dev(tiles))
    ref, out = y.float().clone(), y.clone()
    L.add_lora_ref(ref, x.float(), a.float(), b.float(), sub_sizes, batch)
    assert LT.add_lora(out, x, a, b, sub_sizes, batch, config)
    none = torch.from_numpy(slots < 0).to(DEV)
    assert torch.equal(out[none], y[none])
    assert (out.float() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    if (slots >= 0).any():
        assert not torch.allclose(ref, y.float())


@pytest.mark.parametrize("rank,sub_sizes", [(16, (64, 32, 32)), (8, (48, 16)), (64, (32, 32))])
def test_programs_loop_over_many_tiles_and_column_blocks(rank, sub_sizes):
    """Few programs for many tiles: each takes every 3rd tile (12 slots, uneven runs: tiles of 1 to 16
    tokens; with max_tiles' unused tiles after them, then with none) and every 2nd to 3rd 16-column
    block, crossing the sub-modules' boundaries; the input split in 3."""
    t, k, slots_n = 200, 80, 12
    x, y, a, b, slots = case(t, k, sub_sizes, rank, slots=slots_n, seed=rank + 5)
    config = LT.LoRAKernelConfig(groups=3, programs=6, block_n=16, block_k=32, splits=3)
    n_tiles = L.max_tiles(t, slots_n)
    p = LT.plan(t, k, sub_sizes, rank, n_tiles, config)
    used = int((L.tile_layout(slots, slots_n)[1] >= 0).sum())
    n_blocks = sum(sub_sizes) // 16
    assert p.shrink_grid[0] == p.expand_grid[0] == 3 and used > 3 * 4 and 1 < p.col_groups < n_blocks
    check(x, y, a, b, sub_sizes, slots, slots_n, config)
    check(x, y, a, b, sub_sizes, slots, slots_n, config, num_tiles=used)  # no unused tile: the last one counts


def test_plan_at_8b_decode_is_small_and_independent_of_slots():
    """The grids of Llama-3.1-8B's projections at a 128-token decode bucket: the same for 8, 32 or 128
    slots (40 tiles for 32), a few hundred programs (was 40 x N/64 for the expand: 17,920 for gate_up);
    a prefill's tiles give one group each and need no split past 2."""
    shapes = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
              "down": (14336, (4096,))}
    for k, subs in shapes.values():
        plans = {LT.plan(128, k, subs, 16, L.max_tiles(128, s)) for s in (8, 32, 128)}
        assert len(plans) == 1
        p = plans.pop()
        assert p.groups == 8 and p.block_n == 128 and p.r_blocks == 1
        assert 64 <= np.prod(p.shrink_grid) <= 128 and 128 <= np.prod(p.expand_grid) <= 256
        assert p.splits * p.per_split >= k > (p.splits - 1) * p.per_split
        pre = LT.plan(2048, k, subs, 16, L.max_tiles(2048, 32))
        assert pre.groups == 128 and pre.splits <= 2 and np.prod(pre.expand_grid) <= 256


def test_graph_shaped_batch_with_padding_tiles_and_rows():
    """As a CUDA graph runs it: tiles for the worst case (max_tiles), padding tokens (-1) past the
    batch, one adapter holding most tokens; then no adapter at all (every tile unused)."""
    x, y, a, b, _ = case(32, 64, (64, 32, 32), 16, slots=3, seed=9)
    slots = np.full(32, -1)
    slots[:20] = [0] * 17 + [2, 2, 1]  # 17 tokens of slot 0 take two tiles
    tokens, tiles = L.tile_layout(slots, 3, L.max_tiles(32, 3))
    assert len(tiles) == 2 + 3 and list(tiles[:4]) == [0, 0, 1, 2] and tiles[4] == -1
    assert sorted(tokens[tokens >= 0].tolist()) == list(range(20))
    for config in (LT.DEFAULT, LT.LoRAKernelConfig(groups=2, splits=2, block_k=16)):
        check(x, y, a, b, (64, 32, 32), slots, 3, config, num_tiles=L.max_tiles(32, 3))
    t = lambda v: torch.from_numpy(v).to(DEV)  # noqa: E731
    tokens, tiles = L.tile_layout(np.full(32, -1), 3, L.max_tiles(32, 3))
    idle = y.clone()
    assert LT.add_lora(idle, x, a, b, (64, 32, 32), L.LoRABatch(t(np.full(32, -1)), t(tokens), t(tiles)))
    assert torch.equal(idle, y)


@pytest.mark.parametrize("sub_sizes,rank", [((64, 64), 16), ((64, 32, 32), 8)])
def test_bfloat16_close_to_reference(sub_sizes, rank):
    """bf16 tensors (the interpreter dots them in fp32; its bf16 stores truncate, hence 2e-2)."""
    x, y, a, b, slots = case(40, 96, sub_sizes, rank, slots=3, seed=3, dtype=torch.bfloat16)
    check(x, y, a, b, sub_sizes, slots, 3, LT.LoRAKernelConfig(groups=2, splits=2, block_k=32), tol=2e-2)


def test_widths_no_block_divides_fall_back():
    x, y, a, b, slots = case(4, 16, (24, 8), 8, slots=1, seed=1)
    assert not LT.add_lora(y, x, a, b, (24, 8), L.lora_batch(slots, 1, torch.device(DEV)))
    assert LT.plan(4, 16, (24, 8), 8, 2) is None and LT.plan(4, 16, (48, 8), 8, 2).block_n == 16


COMPILE = r'''
import json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ziggurat.kernels import lora_triton as LT

PTRS = {"tmp_ptr": "*fp32", "tile_tokens_ptr": "*i64", "tile_slots_ptr": "*i64"}
out = {}
for name, fn, consts in [
        ("shrink", LT._shrink, dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=128, F32=False)),
        ("expand", LT._expand, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_R=16, N_SUB=3, SPLITS=16, F32=False))]:
    args = [a for a in fn.arg_names if a not in consts]
    sig = {a: PTRS.get(a, "*bf16") if a.endswith("_ptr") else "i32" for a in args}
    sig.update({c: "constexpr" for c in consts})
    # as the JIT specializes them at the 8B's shapes: pointers and widths/strides divisible by 16
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in args if a not in ("n_tiles", "BLOCKS_PER")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([sys.argv[1], "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    out[name] = dict(regs=int(res["REG"]), stack=int(res["STACK"]), cp_async=k.asm["ptx"].count("cp.async.cg"))
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """The compiled (not interpreted) kernels for sm_90, built on this CPU with Triton's own ptxas: they
    compile, spill no registers, and their loops load through cp.async (software-pipelined)."""
    import json
    import pathlib
    import subprocess
    import sys

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("Triton's CUDA backend tools are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", COMPILE, str(cuobjdump)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    for name, u in usage.items():
        assert u["stack"] == 0 and u["regs"] <= 160 and u["cp_async"] > 0, (name, u)
