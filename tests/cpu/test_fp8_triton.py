"""FP8 kernels against their torch references, on the CPU through Triton's interpreter.

Bounds, and why:
- Quantization (activations, KV store): the kernels do the reference's fp32
  operations in the same order and cast with the same rounding (round to
  nearest even), so the fp8 bytes are equal. The one exception is the fused
  rotary store, whose rotated k differs from the reference's by an fp32 ulp:
  a value that sits on an e4m3 rounding boundary may then round the other way,
  one e4m3 step (2^-3 relative) on rare elements.
- fp8 GEMV vs dequantize-then-matmul: the same exact products (an e4m3 value
  times an fp32 activation is exact in fp32), summed in another order, and the
  channel scale applied after the sum instead of before: fp32 rounding only,
  relative error < 1e-5. With bf16 activations the output is rounded to bf16
  (the interpreter truncates: 2^-7 relative per element), so < 1e-2.
- W8A8 (per-token activation quantization + torch._scaled_mm) vs its reference
  (the same quantization in torch, then an fp32 matmul): exact products again,
  < 1e-5. Against the weight-only numerics it carries the activations' e4m3
  rounding: at most 2^-4 relative per element, about 2^-4 / sqrt(3) = 3.6%
  RMS for uniformly spread mantissas, so the output's relative error < 0.05.
- Paged attention over an FP8 cache vs the reference on the dequantized
  cache: the scales are folded into the softmax scale and the accumulator,
  exact up to fp32 rounding: < 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEV, interpreted_triton, paged_case

triton = interpreted_triton()

from ziggurat.kernels import attention, fp8, kv_cache  # noqa: E402
from ziggurat.kernels.fp8 import FP8, fp8_linear, fp8_linear_ref, quantize_per_token_ref  # noqa: E402
from ziggurat.kernels import attention_triton as AT  # noqa: E402
from ziggurat.kernels import elementwise_triton as ET  # noqa: E402
from ziggurat.kernels import fp8_triton as FT  # noqa: E402
from ziggurat.models.quantization import quantize_weight  # noqa: E402



def rel_err(out, ref) -> float:
    assert not torch.isnan(out.float()).any()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def fp8_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0  # an all-zero channel: scale MIN_SCALE, zeros out, never NaN
    q, s = quantize_weight(w)
    return q.to(DEV), s.to(DEV)


def test_interpreter_casts_to_fp8_as_torch_does():
    # The patched interpreter cast (kernels/interpret.py): 7.86 -> 8 (a carry into the exponent), ties to even.
    x = torch.tensor([7.86, -7.86, 0.8631, 15.6, 448.0, 0.0, 1e-9, 2.0**-9 * 1.5, 13.0, 240.0])
    q, _ = FT.quantize_per_token(x.view(1, -1), torch.ones(1))
    assert torch.equal(q.view(torch.uint8), x.view(1, -1).to(FP8).view(torch.uint8))


@pytest.mark.parametrize("m,k", [(1, 5), (3, 64), (7, 1000), (2, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_per_token_equals_reference(m, k, dtype, static):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m).view(m, 1)).to(DEV, dtype)
    if m > 1:
        x[1] = 0  # a zero token
    x_scale = torch.tensor([0.05], device=DEV) if static else None  # static: large values clip to 448
    q, s = FT.quantize_per_token(x, x_scale, block=256)
    rq, rs = quantize_per_token_ref(x, x_scale)
    assert q.dtype == FP8 and s.shape == (m, 1)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k,config", [(37, 300, (8, 128, 4, 1)), (64, 256, (4, 64, 4, 1)), (5, 40, None),
                                        (130, 2100, None)])
def test_fp8_gemv_equals_dequantized_reference(monkeypatch, m, n, k, config):
    w, s = fp8_weight(n, k, n + k)
    g = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    assert rel_err(FT.fp8_gemv(x, w, s, config=config), fp8_linear_ref(x, w, s)) < 1e-5
    out = FT.fp8_gemv(x, w, s, b, config=config)
    assert rel_err(out, fp8_linear_ref(x, w, s, b)) < 1e-5
    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    assert torch.equal(fp8_linear(x, w, s, b), FT.fp8_gemv(x, w, s, b))  # M <= 2 dispatches to the GEMV
    assert torch.equal(out[:, 0], b.expand(m, n)[:, 0])  # the zero channel: bias alone
    xb = x.bfloat16()
    got = FT.fp8_gemv(xb, w, s, b.bfloat16(), config=config)
    assert got.dtype == torch.bfloat16 and rel_err(got, fp8_linear_ref(xb.float(), w, s, b)) < 1e-2
    with pytest.raises(ValueError, match="fp8_gemv"):
        FT.fp8_gemv(torch.randn(9, k, device=DEV), w, s)
    with pytest.raises(ValueError, match="w_scale"):
        FT.fp8_gemv(x, w, s.double())


@pytest.mark.parametrize("m,n,k", [(5, 48, 64), (33, 128, 96), (3, 16, 2048)])
def test_w8a8_path_equals_its_reference_and_stays_near_weight_only(monkeypatch, m, n, k):
    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    w, s = fp8_weight(n, k, m)
    g = torch.Generator().manual_seed(k)
    x, b = torch.randn(m, k, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    for x_scale in (None, torch.tensor([0.02], device=DEV)):
        ref = fp8_linear_ref(x, w, s, b, x_scale, w8a8=True)
        direct = fp8._scaled_mm(x, w, s, b, x_scale)  # the Triton quantization + torch._scaled_mm
        assert rel_err(direct, ref) < 1e-5
        assert torch.equal(fp8_linear(x, w, s, b, x_scale), direct)  # M > 2 dispatches there
    assert rel_err(fp8_linear(x, w, s), fp8_linear_ref(x, w, s)) < 0.05
    monkeypatch.setenv("ZIGGURAT_FP8_GEMM", "dequant")  # weight-only at every M
    assert rel_err(fp8_linear(x, w, s, b), fp8_linear_ref(x, w, s, b)) < 1e-5
    monkeypatch.setenv("ZIGGURAT_FP8_GEMM", "scaled_mm")  # W8A8 even for one row
    assert rel_err(fp8_linear(x[:1], w, s), fp8_linear_ref(x[:1], w, s, w8a8=True)) < 1e-5
    monkeypatch.setenv("ZIGGURAT_FP8_GEMM", "bogus")
    with pytest.raises(ValueError, match="ZIGGURAT_FP8_GEMM"):
        fp8_linear(x, w, s)


def fp8_cache_case(seq_lens, q_lens, hkv, g, d, bs, seed):
    """A paged case whose caches are FP8 with per-layer scales, and their dequantized fp32 copies."""
    q, kc, vc, meta = paged_case(seq_lens, q_lens, hkv, g, d, bs, seed, torch.float32, DEV)
    ks, vs = torch.tensor(0.011, device=DEV), torch.tensor(0.007, device=DEV)
    kc8, vc8 = kv_cache.to_cache(kc, kc.to(FP8), ks), kv_cache.to_cache(vc, vc.to(FP8), vs)
    return q, kc8, vc8, ks, vs, meta


@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 4)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_over_fp8_cache(hkv, g, window, num_splits):
    q, kc, vc, ks, vs, meta = fp8_cache_case([1, 17, 64, 130], [1] * 4, hkv, g, 32, 16, seed=hkv + g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 32**-0.5, window, ks, vs)
    deq = attention.paged_attention_ref(q, kc.float() * ks, vc.float() * vs, meta, 32**-0.5, window)
    assert rel_err(ref, deq) < 1e-6  # the reference reads an FP8 cache as its dequantized values
    out = AT.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, 32**-0.5, window,
                          num_splits=num_splits, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 4)])
@pytest.mark.parametrize("window", [None, 24])
def test_prefill_over_fp8_cache(hkv, g, window):
    q, kc, vc, ks, vs, meta = fp8_cache_case([40, 100, 77, 9], [40, 33, 1, 9], hkv, g, 16, 16, seed=g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 0.25, window, ks, vs)
    out = AT.paged_prefill(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
                           0.25, window, block_m=32, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < 1e-5


def test_store_kv_into_fp8_cache():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 16, generator=g).to(DEV) * 3, torch.randn(5, 2, 16, generator=g).to(DEV)
    k[0, 0, 0] = 1e4  # clamps to 448 * scale, not NaN
    ks, vs = torch.tensor(0.5, device=DEV), torch.tensor(0.01, device=DEV)
    kc, vc = (torch.full((4, 16, 2, 16), float("nan"), device=DEV).to(FP8) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([3, 17, -1, 63, 40], device=DEV)
    ET.store_kv(k, v, kc, vc, slots, ks, vs)
    kv_cache.store_kv_ref(k, v, kc2, vc2, slots, ks, vs)
    assert torch.equal(kc.view(torch.uint8), kc2.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))
    assert kc.view(-1, 2, 16)[3, 0, 0].float() * ks == 448 * 0.5
    assert torch.isnan(kc.view(-1, 2, 16)[[0, 1, 2]].float()).all()  # slots nobody wrote


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 32), (3, 1, 16)])
def test_rotary_store_kv_into_fp8_cache(hq, hk, d):
    from ziggurat.models.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(d + hq)
    cache = RotaryEmbedding(d, 256, 10000.0, None).cos_sin_cache.to(DEV)
    qkv = torch.randn(5, (hq + 2 * hk) * d, generator=g).to(DEV)
    q = qkv[:, : hq * d].view(5, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(5, hk, d)
    v = qkv[:, (hq + hk) * d :].view(5, hk, d)
    pos = torch.tensor([0, 7, 100, 255, 3], device=DEV)
    slots = torch.tensor([3, 17, -1, 63, 40], device=DEV)
    ks, vs = torch.tensor(0.02, device=DEV), torch.tensor(0.03, device=DEV)
    kc, vc = (torch.zeros(4, 16, hk, d, device=DEV).to(FP8) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    q1, k1 = ET.rotary_store_kv(q, k, v, pos, cache, kc, vc, slots, ks, vs)
    q2, k2 = kv_cache.rotary_store_kv_ref(q, k, v, pos, cache, kc2, vc2, slots, ks, vs)
    assert rel_err(q1, q2) < 1e-6 and rel_err(k1, k2) < 1e-6
    assert torch.equal(vc.view(torch.uint8), vc2.view(torch.uint8))  # v is not rotated: the same bytes
    a, b = kc.float(), kc2.float()
    differ = a != b
    assert differ.float().mean() < 0.01  # only values on a rounding boundary
    assert ((a - b).abs() <= b.abs() * 2**-3 + 2**-9)[differ].all()  # by one e4m3 step at most


def test_engine_greedy_fp8_triton_path_equals_reference_path(model_factory, monkeypatch):
    """128 greedy steps of an FP8 checkpoint (fp32 compute) with an FP8 KV cache: the Triton
    path (per-token quantization + torch._scaled_mm for the prompt, the fp8 GEMV for every
    decode step, the FP8 KV store and paged attention) equals the torch reference path token
    for token. What applies: both paths compute the same numerics up to fp32 summation
    order (W8A8 above 2 rows, weight-only below); equality with the 16-bit model is not
    expected (test_fp8.py bounds that instead). One sequence: the interpreter runs a
    step in ~0.4 s, so 128 steps of a larger batch would cost minutes."""
    from ziggurat import LLM, SamplingParams

    path = model_factory("llama", quantize="fp8")
    # One program per layer for the tiny shapes (the interpreter runs programs one by one).
    monkeypatch.setattr(FT, "CONFIGS", {(n, k): (n, 64, 4, 1) for n, k in ((128, 64), (64, 64), (256, 64), (64, 128))})
    prompt = [[5, 6, 7, 8, 9] * 4]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    got = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("ZIGGURAT_KERNELS", mode)
        llm = LLM(path, num_kv_blocks=16, kv_cache_dtype="fp8")
        got[mode] = llm.generate(prompt, params)[0].outputs[0].token_ids
        llm.shutdown()
    assert len(got["torch"]) == 128 and len(set(got["torch"])) > 3  # not a degenerate repetition
    assert got["triton"] == got["torch"]


def test_kv_copy_kernel_moves_fp8_caches_byte_for_byte():
    """Prefill/decode hand-offs copy FP8 caches as they are (the scales travel with the checkpoint)."""
    from ziggurat.kernels.kv_copy_triton import copy_blocks
    from ziggurat.models.kv_blocks import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(3)
    mk = lambda: [(torch.randn(10, 16, 4, 128, generator=g).to(FP8),  # noqa: E731
                   torch.randn(10, 16, 4, 128, generator=g).to(FP8)) for _ in range(2)]
    src, dst = mk(), mk()
    # The reference (torch indexing) has no fp8 kernels: it moves the same bytes as uint8.
    as_bytes = lambda caches: [(k.view(torch.uint8), v.view(torch.uint8)) for k, v in caches]  # noqa: E731
    ref = [(k.clone(), v.clone()) for k, v in as_bytes(dst)]
    copy_blocks(src, dst, [3, 7, 0], [5, 1, 9], 2, 0, 2)
    scatter_blocks(ref, gather_blocks(as_bytes(src), [3, 7, 0], 2, 2), [5, 1, 9], 0)
    for (a, b), (c, d) in zip(as_bytes(dst), ref):
        assert torch.equal(a, c) and torch.equal(b, d)
