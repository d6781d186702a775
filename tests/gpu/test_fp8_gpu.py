"""FP8 kernels against their torch references on a GPU, at Llama-3.1-8B's shapes. Skipped without CUDA.

    python -m pytest tests/gpu/test_fp8_gpu.py -q

Bounds (why: tests/cpu/test_fp8_triton.py's docstring): bf16 outputs 1e-2 relative (bf16 output
rounding; the fp8 products are exact in fp32); fp32 outputs 1e-5. Quantization bytes may differ from
the reference only by one e4m3 step, on values at a rounding boundary (the GPU's division may differ
from the CPU's in the last fp32 bit).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from kernel_cases import paged_case  # noqa: E402
from ziggurat.kernels import attention, fp8, kv_cache  # noqa: E402
from ziggurat.kernels import attention_triton as AT  # noqa: E402
from ziggurat.kernels import fp8_triton as FT  # noqa: E402
from ziggurat.models.quantization import quantize_weight  # noqa: E402

FP8_TC = torch.cuda.get_device_capability() >= (8, 9)
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (1000, 1000)]  # 8B's layers, a ragged one


def rel_err(out, ref) -> float:
    assert not torch.isnan(out.float()).any()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def weight(n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return quantize_weight(torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemv(n, k, m, dtype):
    w, s = weight(n, k, n + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    assert rel_err(FT.fp8_gemv(x, w, s), fp8.fp8_linear_ref(x, w, s)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("m,k", [(1, 4096), (7, 14336), (4096, 4096), (33, 1000)])
def test_quantize_per_token(m, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    q, s = FT.quantize_per_token(x)
    rq, rs = fp8.quantize_per_token_ref(x)
    assert torch.equal(s, rs)
    a, b = q.float(), rq.float()
    differ = a != b
    assert differ.float().mean() < 1e-3 and ((a - b).abs() <= b.abs() * 2**-3 + 2**-9)[differ].all()


@pytest.mark.skipif(not FP8_TC, reason="torch._scaled_mm needs FP8 tensor cores (sm_89+)")
@pytest.mark.parametrize("n,k", SHAPES[:4])
@pytest.mark.parametrize("m", [3, 128, 4096])
def test_w8a8_scaled_mm(n, k, m):
    w, s = weight(n, k, m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = fp8.fp8_linear(x, w, s)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, fp8.fp8_linear_ref(x, w, s, w8a8=True)) < 1e-2
    assert rel_err(got, fp8.fp8_linear_ref(x, w, s)) < 0.06  # the activations' e4m3 rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("decode", [True, False])
def test_paged_attention_over_fp8_cache(dtype, decode):
    seq_lens = [1, 300, 4097, 1000] if decode else [40, 1000, 77, 9]
    q_lens = [1] * 4 if decode else [40, 333, 1, 9]
    q, kc, vc, meta = paged_case(seq_lens, q_lens, 8, 4, 128, 16, 0, dtype, "cuda")
    ks, vs = torch.tensor(0.011, device="cuda"), torch.tensor(0.007, device="cuda")
    kc8, vc8 = kv_cache.to_cache(kc, kc.to(fp8.FP8), ks), kv_cache.to_cache(vc, vc.to(fp8.FP8), vs)
    ref = attention.paged_attention_ref(q, kc8, vc8, meta, 128**-0.5, None, ks, vs)
    if decode:
        out = AT.paged_decode(q, kc8, vc8, meta.block_tables, meta.seq_lens, meta.max_seq_len, 128**-0.5,
                              k_scale=ks, v_scale=vs)
    else:
        out = AT.paged_prefill(q, kc8, vc8, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                               meta.max_query_len, 128**-0.5, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_fp8_engine_with_cuda_graphs(tmp_path):
    """An FP8 checkpoint with an FP8 KV cache through the engine with CUDA graphs (GEMV at 1-2 rows,
    scaled_mm above): one sequence gives the eager engine's greedy tokens (the same kernels); a
    3-row batch replays a 4-row bucket, where cuBLAS may sum in another order, so it must agree
    on nearly every token."""
    from ziggurat import LLM, SamplingParams
    from ziggurat.models.maker import make_model

    path = make_model(tmp_path / "m", arch="llama", dtype="bfloat16", quantize="fp8",
                      overrides={"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "head_dim": 64})
    prompts = [[5, 6, 7, 8, 9] * 4, list(range(3, 40)), [11]]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    got = {}
    for eager in (True, False):
        llm = LLM(path, num_kv_blocks=64, kv_cache_dtype="fp8", enforce_eager=eager, max_model_len=256)
        got[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        got[eager, 1] = llm.generate(prompts[:1], params)[0].outputs[0].token_ids
        llm.shutdown()
    assert got[False, 1] == got[True, 1]
    same = sum(a == b for g, e in zip(got[False], got[True]) for a, b in zip(g, e))
    assert same >= 0.9 * 3 * 64
