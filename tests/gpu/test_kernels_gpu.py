"""Triton kernels against the torch references on a GPU: large shapes, bf16
and fp32, block sizes, GQA ratios, contexts up to 32k. Skipped without CUDA.

    python -m pytest tests/gpu -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from ziggurat.kernels import attention, norm, rotary  # noqa: E402
from ziggurat.kernels import attention_triton as AT  # noqa: E402
from ziggurat.kernels import elementwise_triton as ET  # noqa: E402
from kernel_cases import paged_case  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def setup(seq_lens, q_lens, hkv, g, d, bs, dtype, seed=0):
    return paged_case(seq_lens, q_lens, hkv, g, d, bs, seed, dtype, "cuda")


def check(out, ref, dtype):
    assert not torch.isnan(out).any()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hkv,g", [(8, 1), (8, 4), (2, 8), (1, 16)])
def test_decode(dtype, bs, hkv, g):
    seq_lens = [1, 15, 300, 4097, 32768, 1000]
    q, kc, vc, meta = setup(seq_lens, [1] * len(seq_lens), hkv, g, 128, bs, dtype, seed=bs * g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 128**-0.5)
    out = AT.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, 128**-0.5)
    check(out, ref, dtype)


def _decode(q, kc, vc, meta, merge, **kw):
    return AT.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, 128**-0.5, merge=merge, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hkv,g,window", [(8, 4, None), (2, 8, None), (8, 4, 4096)])
@pytest.mark.parametrize("num_splits", [None, 1, 7, 33, 64])
def test_decode_fused_merge(dtype, hkv, g, window, num_splits):
    """The merge folded into the split kernel, at the 8B's shape: equals the two-kernel
    merge (same arithmetic; the compiled reductions may round apart by an ulp), the
    reference, zeros for a padding row; the same bits on every one of 20 calls (a partial
    read before it was visible would change some), and the counters left at 0."""
    seq_lens = [0, 1, 15, 300, 4097, 32768, 1000]
    q, kc, vc, meta = setup(seq_lens, [1] * len(seq_lens), hkv, g, 128, 16, dtype, seed=g)
    kw = {"num_splits": num_splits, "sliding_window": window}
    fused = _decode(q, kc, vc, meta, "fused", **kw)
    two = _decode(q, kc, vc, meta, "kernel", **kw)
    assert torch.equal(fused[0], torch.zeros_like(fused[0]))
    ref = attention.paged_attention_ref(q, kc, vc, meta, 128**-0.5, window)
    check(fused[1:], ref[1:], dtype)
    gap = ((fused.float() - two.float()).norm() / two.float().norm()).item()
    assert gap < (4e-3 if dtype == torch.bfloat16 else 1e-6), gap
    for _ in range(20):
        assert torch.equal(_decode(q, kc, vc, meta, "fused", **kw), fused)
    tickets = AT._TICKETS.get(q.device)  # (none yet when every call so far had one split)
    assert tickets is None or not tickets.any()


def test_decode_fused_merge_under_a_cuda_graph(monkeypatch):
    """Captured once for 32k contexts and replayed at other lengths (counters reset between
    replays); a capture that would need a larger counter buffer takes the two-kernel merge
    instead of allocating inside the graph."""
    seq_lens = [700, 32768, 5, 4097]
    q, kc, vc, meta = setup(seq_lens, [1] * 4, 8, 4, 128, 16, torch.bfloat16, seed=1)
    lens = meta.seq_lens.clone()

    def forward():
        return AT.paged_decode(q, kc, vc, meta.block_tables, lens, 32768, 128**-0.5)

    def replay_at(graph, out, new_lens):  # (the tables span 32k for every row: block 0 past a row's own)
        lens.copy_(torch.tensor(new_lens, device="cuda", dtype=lens.dtype))
        graph.replay()
        now = dataclasses.replace(meta, seq_lens=lens.clone(), seq_lens_cpu=new_lens, max_seq_len=max(new_lens))
        ref = attention.paged_attention_ref(q, kc, vc, now, 128**-0.5)
        live = torch.tensor(new_lens, device="cuda") > 0
        check(out[live], ref[live], torch.bfloat16)
        assert not out[~live].any()

    forward()  # compiles outside the capture (and sizes the counters)
    before = AT._TICKETS[q.device]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = forward()
    for new_lens in ([700, 32768, 5, 4097], [1, 3000, 17, 9000], [32768, 1, 2, 0]):
        replay_at(g, out, new_lens)
    assert AT._TICKETS[q.device] is before and not before.any()

    monkeypatch.setattr(AT, "_TICKETS", {q.device: torch.zeros(2, dtype=torch.int32, device="cuda")})
    AT.paged_decode(q, kc, vc, meta.block_tables, lens, 32768, 128**-0.5, merge="kernel")  # compile the fallback
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        out2 = forward()  # 4 x 8 counters needed, 2 held: the two-kernel merge
    assert AT._TICKETS[q.device].numel() == 2
    replay_at(g2, out2, [1, 3000, 17, 9000])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hkv,g", [(8, 4), (2, 8)])
def test_prefill_and_chunks(dtype, bs, hkv, g):
    seq_lens, q_lens = [4096, 8192, 700, 33, 32768], [4096, 1024, 1, 33, 512]
    q, kc, vc, meta = setup(seq_lens, q_lens, hkv, g, 128, bs, dtype, seed=bs + g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 128**-0.5)
    out = AT.paged_prefill(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
                           128**-0.5)
    check(out, ref, dtype)


def test_fresh_prompts_through_sdpa_mix_with_paged_kernel(monkeypatch):
    from kernel_cases import step_kv

    monkeypatch.setenv("ZIGGURAT_FRESH_PREFILL", "sdpa")
    seq_lens, q_lens = [4096, 8192, 700, 100, 2000], [4096, 1024, 1, 100, 2000]
    q, kc, vc, meta = setup(seq_lens, q_lens, 8, 4, 128, 16, torch.bfloat16, seed=3)
    k, v = step_kv(kc, vc, meta)
    plan = attention._mixed_plan(meta, q, kc.shape[1], use_sdpa=True)
    assert [e - s for s, e in plan.fresh] == [4096, 2000] and plan.single.count == 1  # the decode row
    out = attention.paged_attention(q, kc, vc, meta, 128**-0.5, None, k, v)
    check(out, attention.paged_attention_ref(q, kc, vc, meta, 128**-0.5), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_rotary(dtype):
    x, r = torch.randn(2, 4096, 4096, device="cuda").to(dtype)
    w = torch.randn(4096, device="cuda").to(dtype)
    check(ET.rms_norm(x, w, 1e-5), norm.rms_norm_ref(x, w, 1e-5), dtype)
    out, res = ET.rms_norm(x, w, 1e-5, r)
    check(out, norm.rms_norm_ref(x + r, w, 1e-5), dtype)
    from ziggurat.models.rotary import RotaryEmbedding

    cache = RotaryEmbedding(128, 32768, 500000.0, None).cos_sin_cache.cuda()
    q, k = torch.randn(4096, 32, 128, device="cuda").to(dtype), torch.randn(4096, 8, 128, device="cuda").to(dtype)
    pos = torch.randint(0, 32768, (4096,), device="cuda")
    kc, vc = (torch.zeros(16, 16, 8, 128, device="cuda", dtype=dtype) for _ in range(2))
    q1, k1 = ET.rotary_store_kv(q, k, k, pos, cache, kc, vc, torch.full((4096,), -1, device="cuda"))
    q2, k2 = rotary.apply_rotary_ref(q, k, pos, cache)
    check(q1, q2, dtype)
    check(k1, k2, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 7, 4096])
def test_rotary_store_kv_fused(dtype, t):
    from ziggurat.kernels import kv_cache
    from ziggurat.models.rotary import RotaryEmbedding

    cache = RotaryEmbedding(128, 32768, 500000.0, None).cos_sin_cache.cuda()
    qkv = torch.randn(t, 48 * 128, device="cuda").to(dtype)
    q, k, v = (x.view(t, -1, 128) for x in qkv.split([32 * 128, 8 * 128, 8 * 128], dim=1))
    pos = torch.randint(0, 32768, (t,), device="cuda")
    slots = torch.randperm(4096 * 16, device="cuda")[:t]
    slots[1::5] = -1
    kc, vc = (torch.zeros(4096, 16, 8, 128, device="cuda", dtype=dtype) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    q1, k1 = ET.rotary_store_kv(q, k, v, pos, cache, kc, vc, slots)
    q2, k2 = kv_cache.rotary_store_kv_ref(q, k, v, pos, cache, kc2, vc2, slots)
    check(q1, q2, dtype)
    check(k1, k2, dtype)
    assert torch.equal(vc, vc2)
    ok = slots >= 0
    check(kc.view(-1, 8, 128)[slots[ok]], kc2.view(-1, 8, 128)[slots[ok]], dtype)


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (128256, 4096), (37, 300), (1000, 1000)])
def test_gemv(m, n, k):
    """The Triton GEMV against torch's matmul, bf16, with and without bias
    (shapes not a multiple of the tile included)."""
    from ziggurat.kernels import gemv_triton, matmul

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    check(gemv_triton.gemv(x, w), torch.nn.functional.linear(x, w), torch.bfloat16)
    check(gemv_triton.gemv(x, w, b), torch.nn.functional.linear(x, w, b), torch.bfloat16)
    check(matmul.linear(x, w), torch.nn.functional.linear(x, w), torch.bfloat16)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k", [(4096, 14336), (4096, 4096), (37, 300)])
def test_gated_gemv(m, n, k):
    """The down GEMV with silu_and_mul as its prologue, at the 8B's down shape: the same
    bits as silu_and_mul then the GEMV on the same config, for bf16 and FP8 weights; the
    dispatch (matmul.linear gated) equals the two ops whichever path this GPU takes."""
    from ziggurat.kernels import fp8_triton, gemv_triton, matmul

    x = (torch.randn(m, 2 * k, device="cuda") * 3).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    config = gemv_triton.config_for(x.device, n, k) or gemv_triton.DEFAULT_CONFIG
    act = ET.silu_and_mul(x)
    fused = gemv_triton.gemv(x, w, b, config, gated=True)
    assert torch.equal(fused, gemv_triton.gemv(act, w, b, config))
    check(fused, torch.nn.functional.linear(act.float(), w.float(), b.float()), torch.bfloat16)
    assert torch.equal(matmul.linear(x, w, b, gated=True), matmul.linear(act, w, b))
    w8 = w.float().to(torch.float8_e4m3fn)
    s = torch.rand(n, device="cuda") + 0.5
    assert torch.equal(fp8_triton.fp8_gemv(x, w8, s, b, gated=True), fp8_triton.fp8_gemv(act, w8, s, b))
    assert torch.equal(matmul.linear(x, w8, None, s, gated=True), matmul.linear(act, w8, None, s))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gumbel_sample_large_vocab(dtype):
    """At Llama 3's vocabulary: greedy rows exact, a top-k-filtered row never
    leaves its k tokens, and draws of a fixed row follow softmax(x / T)."""
    from ziggurat.kernels.sampling_triton import gumbel_sample

    v = 128256
    logits = torch.randn(64, v, device="cuda").to(dtype)
    t = torch.full((64,), 0.7, device="cuda")
    t[::2] = 0
    got = gumbel_sample(logits, t, 1 << 41)
    assert torch.equal(got[::2], logits[::2].float().argmax(1))
    kth = logits.float().topk(5, dim=1).values[:, -1:]
    filtered = torch.where(logits.float() >= kth, logits.float(), float("-inf"))
    for s in range(20):
        d = gumbel_sample(filtered, t, (1 << 41) + 1000 * s)
        assert bool((filtered.gather(1, d.unsqueeze(1)) > float("-inf")).all())
    x = torch.randn(200, device="cuda") * 2
    many = gumbel_sample(x.repeat(20000, 1).to(dtype), torch.full((20000,), 0.7, device="cuda"), 1 << 41,
                         torch.arange(20000, device="cuda", dtype=torch.int64) * 7919)
    freq = torch.bincount(many, minlength=200).float() / 20000
    assert 0.5 * (freq - torch.softmax(x.to(dtype).float() / 0.7, 0)).abs().sum() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul(dtype):
    from ziggurat.kernels.activation import silu_and_mul_ref

    x = (torch.randn(4096, 2 * 14336, device="cuda") * 3).to(dtype)
    got, ref = ET.silu_and_mul(x), silu_and_mul_ref(x)
    # Same rounding steps as torch's silu then multiply: equal up to exp's last bits.
    assert (got.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < (1e-3 if dtype == torch.bfloat16 else 1e-6)


def test_cuda_graph_decode_equals_eager(model_factory):
    """Decode through captured CUDA graphs gives the eager path's greedy tokens:
    batch sizes across several buckets (padding rows), long generations that
    cross KV blocks, and a sliding-window model."""
    from ziggurat import LLM, SamplingParams

    for arch in ("llama", "mistral"):
        path = model_factory(arch)
        prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(19)]
        params = [SamplingParams(temperature=0, max_tokens=40 + 5 * i, ignore_eos=True) for i in range(19)]
        got = {}
        for eager in (True, False):
            llm = LLM(path, num_kv_blocks=512, enforce_eager=eager, dtype="float32")
            assert (llm.engine.executor.worker.runner.graphs is None) == eager
            got[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got[False] == got[True]


def test_greedy_optimized_equals_reference_128_steps(model_factory, monkeypatch):
    from ziggurat import LLM, SamplingParams

    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        path = model_factory(arch)
        prompts = [[5, 6, 7, 8, 9] * 9, list(range(3, 200)), [11]]
        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        monkeypatch.setenv("ZIGGURAT_KERNELS", "torch")
        ref = [o.outputs[0].token_ids for o in LLM(path, num_kv_blocks=128).generate(prompts, params)]
        monkeypatch.setenv("ZIGGURAT_KERNELS", "auto")
        got = [o.outputs[0].token_ids for o in LLM(path, num_kv_blocks=128).generate(prompts, params)]
        assert got == ref


def test_penalties_and_mixed_sampling_on_the_gpu_path(model_factory, monkeypatch):
    """Greedy rows with repetition/frequency/presence penalties (device
    penalty tables, counts bumped on the GPU, async steps) give the reference
    path's tokens, while random rows share their batches (Triton sampler); a
    seeded random row repeats itself across runs and batch mixes."""
    from ziggurat import LLM, SamplingParams

    path = model_factory("llama")
    prompts = [list(range(3, 60)), [5, 6, 7, 8, 9] * 9, [11, 12], list(range(100, 140))]
    greedy = [SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, frequency_penalty=0.7,
                             presence_penalty=0.3)]
    hot = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=64, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=42, max_tokens=32, ignore_eos=True)
    monkeypatch.setenv("ZIGGURAT_KERNELS", "torch")
    ref = [o.outputs[0].token_ids for o in LLM(path, num_kv_blocks=128).generate(prompts[:2], greedy)]
    monkeypatch.setenv("ZIGGURAT_KERNELS", "auto")
    llm = LLM(path, num_kv_blocks=128)
    outs = llm.generate(prompts, greedy + [hot, seeded])
    assert [o.outputs[0].token_ids for o in outs[:2]] == ref
    again = llm.generate([prompts[1], prompts[3]], [hot, seeded])
    assert again[1].outputs[0].token_ids == outs[3].outputs[0].token_ids


def test_unfiltered_random_rows_next_to_greedy_rows(model_factory, monkeypatch):
    """The OpenAI default (temperature 1, no top-k/top-p) mixed with greedy
    requests, parameters from the device table: greedy rows equal the
    reference path's tokens."""
    from ziggurat import LLM, SamplingParams

    path = model_factory("llama")
    prompts = [list(range(3, 60)), [5, 6, 7, 8, 9] * 9, [11, 12], list(range(100, 140)), [7] * 30, [9, 8, 7]]
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    hot = SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True)
    monkeypatch.setenv("ZIGGURAT_KERNELS", "torch")
    ref = [o.outputs[0].token_ids for o in LLM(path, num_kv_blocks=128).generate(prompts[1::2], greedy)]
    monkeypatch.setenv("ZIGGURAT_KERNELS", "auto")
    outs = LLM(path, num_kv_blocks=128).generate(prompts, [hot, greedy] * 3)
    assert [o.outputs[0].token_ids for o in outs[1::2]] == ref
