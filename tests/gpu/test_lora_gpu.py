"""LoRA on a GPU: the Triton kernels against the reference at Llama-3.1-8B shapes (bf16, fp32; the
default launch config and the others the benchmark sweeps), deterministic, and decode through
captured CUDA graphs with adapters equal to eager. Skipped without CUDA.

    python -m pytest tests/gpu/test_lora_gpu.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from ziggurat.kernels import lora as L  # noqa: E402
from ziggurat.kernels import lora_triton as LT  # noqa: E402

SHAPES = {  # 8B, TP=1: (in, sub-module widths)
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("t,slots", [(1, 1), (128, 8), (256, 32), (2048, 3)])
def test_kernel_matches_reference_at_8b_shapes(dtype, layer, t, slots):
    k, subs = SHAPES[layer]
    rank = 16
    g = torch.Generator(device="cuda").manual_seed(t + slots)
    a = (torch.randn(slots, len(subs) * rank, k, generator=g, device="cuda") * 0.05).to(dtype)
    b = (torch.randn(slots, sum(subs), rank, generator=g, device="cuda") * 0.05).to(dtype)
    x = torch.randn(t, k, generator=g, device="cuda").to(dtype)
    y = torch.randn(t, sum(subs), generator=g, device="cuda").to(dtype)
    token_slots = np.random.default_rng(t).integers(-1, slots, t)
    batch = L.lora_batch(token_slots, slots, torch.device("cuda"))
    ref, out = y.float().clone(), y.clone()
    L.add_lora_ref(ref, x.float(), a.float(), b.float(), subs, batch)
    assert LT.add_lora(out, x, a, b, subs, batch)
    err = ((out.float() - ref).norm() / (ref - y.float()).norm().clamp_min(1e-6)).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err
    again = y.clone()
    assert LT.add_lora(again, x, a, b, subs, batch)
    assert torch.equal(again, out)  # deterministic: one writer per element, splits summed in a fixed order


CONFIGS = [  # the knobs of LT.LoRAKernelConfig that scripts/bench_lora_kernels.py --configs sweeps
    LT.LoRAKernelConfig(block_n=256, block_k=64),
    LT.LoRAKernelConfig(programs=64, k_per_split=256, num_warps=8),
    LT.LoRAKernelConfig(programs=1024, block_n=64, max_splits=4),
    LT.LoRAKernelConfig(groups=2, splits=3),  # programs looping over many tiles, an uneven split
]


@pytest.mark.parametrize("config", CONFIGS, ids=["wide_n", "few_programs", "many_programs", "looping"])
@pytest.mark.parametrize("layer", list(SHAPES))
@pytest.mark.parametrize("t,slots,used", [(128, 32, 8), (128, 32, 32), (2048, 3, 3)])
def test_configs_match_reference(config, layer, t, slots, used):
    """Every config at the 8B's shapes (bf16), with a graph bucket's unused tiles (max_tiles for 32
    slots) and tokens without an adapter."""
    k, subs = SHAPES[layer]
    rank = 16
    g = torch.Generator(device="cuda").manual_seed(t + used)
    a = (torch.randn(slots, len(subs) * rank, k, generator=g, device="cuda") * 0.05).bfloat16()
    b = (torch.randn(slots, sum(subs), rank, generator=g, device="cuda") * 0.05).bfloat16()
    x = torch.randn(t, k, generator=g, device="cuda").bfloat16()
    y = torch.randn(t, sum(subs), generator=g, device="cuda").bfloat16()
    token_slots = np.where(np.arange(t) % 9 == 8, -1, np.arange(t) % used)
    batch = L.lora_batch(token_slots, slots, torch.device("cuda"))
    ref, out = y.float().clone(), y.clone()
    L.add_lora_ref(ref, x.float(), a.float(), b.float(), subs, batch)
    assert LT.add_lora(out, x, a, b, subs, batch, config)
    none = torch.from_numpy(token_slots < 0).cuda()
    assert torch.equal(out[none], y[none])
    err = ((out.float() - ref).norm() / (ref - y.float()).norm().clamp_min(1e-6)).item()
    assert err < 2e-2, err


def test_graphs_with_adapters_equal_eager(tmp_path):
    from ziggurat import LLM, LoRARequest, SamplingParams
    from ziggurat.models.lora_maker import make_adapter
    from ziggurat.models.maker import make_model

    path = make_model(tmp_path / "m", arch="llama", preset="tiny", dtype="float32")
    loras = [LoRARequest(f"a{i}", i + 1, str(make_adapter(path, tmp_path / f"a{i}", rank=8, seed=i, scale=0.3)))
             for i in range(3)]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, int(rng.integers(3, 60))).tolist() for _ in range(12)]
    which = [loras[i % 3] if i % 4 else None for i in range(12)]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = []
    for eager in (True, False):
        llm = LLM(str(path), enable_lora=True, max_loras=3, enforce_eager=eager, gpu_memory_utilization=0.3)
        try:
            assert (llm.engine.executor.worker.runner.graphs is None) == eager
            got.append([o.outputs[0].token_ids for o in llm.generate(prompts, p, lora_request=which, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert got[0] == got[1]


def test_base_only_steps_replay_graphs_without_the_lora_ops(tmp_path):
    """A LoRA engine's steps with no adapter replay the base graphs (captured without the LoRA ops),
    and give the tokens an engine without LoRA gives."""
    from ziggurat import LLM, SamplingParams
    from ziggurat.models.maker import make_model

    path = make_model(tmp_path / "m", arch="llama", preset="tiny", dtype="float32")
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40)]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = []
    for lora in (True, False):
        llm = LLM(str(path), enable_lora=lora, max_loras=2, gpu_memory_utilization=0.3)
        try:
            graphs = llm.engine.executor.worker.runner.graphs
            assert bool(graphs.base_graphs) == lora and set(graphs.base_graphs) <= set(graphs.graphs)
            got.append([o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert got[0] == got[1]
