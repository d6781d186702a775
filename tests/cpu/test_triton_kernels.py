"""Triton kernels against their torch references, on the CPU through Triton's
interpreter (small shapes; tests/gpu/ covers large shapes on a GPU)."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import DEV, interpreted_triton, paged_case, step_kv

triton = interpreted_triton()

from ziggurat.kernels import attention, kv_cache, norm, rotary  # noqa: E402
from ziggurat.kernels import attention_triton as AT  # noqa: E402
from ziggurat.kernels import elementwise_triton as ET  # noqa: E402



def paged_setup(seq_lens, q_lens, hkv, g, d, bs, seed, dtype=torch.float32):
    return paged_case(seq_lens, q_lens, hkv, g, d, bs, seed, dtype, DEV)


def rel_err(out, ref) -> float:
    assert not torch.isnan(out).any()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 4), (1, 8), (2, 3)])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_matches_reference(bs, hkv, g, window, num_splits):
    seq_lens = [1, 17, 64, 130]
    q, kc, vc, meta = paged_setup(seq_lens, [1] * 4, hkv, g, 32, bs, seed=bs + hkv * 7 + g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 32**-0.5, window)
    out = AT.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, 32**-0.5, window,
                          num_splits=num_splits)
    assert rel_err(out, ref) < 1e-5


def test_decode_padding_rows_give_zeros_and_leave_others_alone():
    # CUDA-graph padding: a row with seq_len 0 must come out finite (zero),
    # and a grid sized for a longer max_seq_len changes no real row.
    q, kc, vc, meta = paged_setup([40, 130, 7], [1] * 3, 2, 4, 32, 16, seed=5)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 32**-0.5)
    lens = meta.seq_lens.clone()
    lens[1] = 0
    out = AT.paged_decode(q, kc, vc, meta.block_tables, lens, 4096, 32**-0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = torch.tensor([0, 2])
    assert rel_err(out[keep], ref[keep]) < 1e-5


@pytest.mark.parametrize("hkv,g,window", [(1, 1, None), (1, 4, 40), (2, 3, None)])
def test_decode_fused_merge_equals_the_two_kernel_merge(monkeypatch, hkv, g, window):
    """The merge folded into the split kernel (the last ticket's program merges, or one
    split writes the output) gives the two-kernel path's bits: 1 to 8 splits, GQA groups,
    a sliding window, a padding row (seq_len 0: zeros). Tiles of 16 keys, so the splits
    differ; the merge folds 2 splits a step, so its loop runs more than once."""
    monkeypatch.setattr(AT, "MERGE_TILE", 32)  # 32 // (G * D) splits a step: at most 2 here
    q, kc, vc, meta = paged_setup([0, 17, 90], [1] * 3, hkv, g, 16, 16, seed=10 * hkv + g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 0.25, window)
    for splits in (1, 2, 3, 5, 8):
        def run(merge):
            return AT.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.25, window,
                                   num_splits=splits, pages_per_tile=1, merge=merge)

        fused = run("fused")
        assert torch.equal(fused, run("kernel")), splits
        assert torch.equal(fused[0], torch.zeros_like(fused[0]))
        assert rel_err(fused[1:], ref[1:]) < 1e-5


def test_decode_fused_merge_twice_on_the_same_buffers(monkeypatch):
    """The last ticket sets its counter back to 0, so a second call on the same buffers
    (a CUDA graph's replay) merges again and gives the same output; a batch that needs more
    counters grows the buffer and keeps the old one alive (a captured graph may address it)."""
    monkeypatch.setattr(AT, "_TICKETS", {})
    monkeypatch.setattr(AT, "_RETIRED", [])
    monkeypatch.setattr(AT, "MIN_TICKETS", 4)
    q, kc, vc, meta = paged_setup([50, 130, 3], [1] * 3, 2, 4, 16, 16, seed=4)

    def run(rows):
        return AT.paged_decode(q[:rows], kc, vc, meta.block_tables[:rows], meta.seq_lens[:rows], 130, 0.25,
                               num_splits=4, pages_per_tile=1, merge="fused")

    first = run(2)  # 2 sequences x 2 KV heads: 4 counters
    small = AT._TICKETS[q.device]
    assert small.numel() == 4 and not small.any()
    assert torch.equal(run(2), first) and AT._TICKETS[q.device] is small and not small.any()
    third = run(3)  # 6 counters: a new buffer, the old one retired, not freed
    assert AT._TICKETS[q.device].numel() == 6 and AT._RETIRED == [small] and not AT._TICKETS[q.device].any()
    assert torch.equal(third[:2], first)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 0.25)
    assert rel_err(third, ref) < 1e-5


def test_decode_merge_setting(monkeypatch):
    monkeypatch.setenv("ZIGGURAT_DECODE_MERGE", "kernel")
    assert AT.decode_merge() == "kernel"
    monkeypatch.setenv("ZIGGURAT_DECODE_MERGE", "two")
    with pytest.raises(ValueError, match="ZIGGURAT_DECODE_MERGE"):
        AT.decode_merge()
    monkeypatch.delenv("ZIGGURAT_DECODE_MERGE")
    assert AT.decode_merge() == "fused"


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hkv,g", [(1, 1), (2, 4)])
@pytest.mark.parametrize("window", [None, 24])
def test_prefill_and_chunked_prefill_match_reference(bs, hkv, g, window):
    # Whole prompts, a chunk after a cached prefix, and a decode row, mixed in one batch.
    seq_lens, q_lens = [40, 100, 77, 9], [40, 33, 1, 9]
    q, kc, vc, meta = paged_setup(seq_lens, q_lens, hkv, g, 16, bs, seed=bs + g)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 0.25, window)
    out = AT.paged_prefill(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
                           0.25, window, block_m=32)
    assert rel_err(out, ref) < 1e-5


def test_fresh_prompts_through_sdpa_mix_with_paged_kernel(monkeypatch):
    # Long prompts with no cached context go through SDPA on the step's dense
    # k/v; everything else (chunks with context, decodes, short prompts) through
    # the paged kernel, which skips the SDPA rows. Same result as the reference.
    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    monkeypatch.setenv("ZIGGURAT_FRESH_PREFILL", "sdpa")
    monkeypatch.setattr(attention, "SDPA_MIN_LEN", 40)
    monkeypatch.setattr(attention, "SDPA_DTYPES", (torch.float32,))  # the interpreter's bf16 is not exact
    seq_lens, q_lens = [70, 90, 45, 30, 120], [70, 20, 1, 30, 120]  # fresh, chunk, decode, short fresh, fresh
    q, kc, vc, meta = paged_setup(seq_lens, q_lens, 2, 4, 32, 16, seed=9)
    k, v = step_kv(kc, vc, meta)
    calls = []
    real = attention._sdpa_causal
    monkeypatch.setattr(attention, "_sdpa_causal", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    out = attention.paged_attention(q, kc, vc, meta, 32**-0.5, None, k, v)
    ref = attention.paged_attention_ref(q, kc, vc, meta, 32**-0.5)
    assert sorted(calls) == [70, 120]
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("n", [64, 96, 100])
def test_rms_norm_and_fused_add(n):
    g = torch.Generator().manual_seed(n)
    x, r = (torch.randn(5, n, generator=g).to(DEV) for _ in range(2))
    w = torch.randn(n, generator=g).to(DEV)
    assert rel_err(ET.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6)) < 1e-6
    out, res = ET.rms_norm(x, w, 1e-6, r)
    assert torch.equal(res, x + r)
    assert rel_err(out, norm.rms_norm_ref(x + r, w, 1e-6)) < 1e-6


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 32), (3, 1, 16), (8, 8, 64)])
def test_rotary_llama3_scaling(hq, hk, d):
    from ziggurat.models.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(d)
    rot = RotaryEmbedding(d, 512, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cache = rot.cos_sin_cache.to(DEV)
    qkv = torch.randn(6, (hq + 2 * hk) * d, generator=g).to(DEV)  # q and k as strided views, as in the model
    q = qkv[:, : hq * d].view(6, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(6, hk, d)
    pos = torch.tensor([0, 1, 5, 63, 64, 511], device=DEV)
    kc, vc = (torch.zeros(4, 16, hk, d, device=DEV) for _ in range(2))
    no_store = torch.full((6,), -1, device=DEV)  # rotation alone (the store is tested below)
    q1, k1 = ET.rotary_store_kv(q, k, k, pos, cache, kc, vc, no_store)
    q2, k2 = rotary.apply_rotary_ref(q, k, pos, cache)
    assert rel_err(q1, q2) < 1e-6 and rel_err(k1, k2) < 1e-6


# The interpreter casts to bf16 by truncation, not rounding: bf16 is checked on GPUs only.
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else []))
@pytest.mark.parametrize("inter", [8, 1000, 1500])
def test_silu_and_mul(dtype, inter):
    from ziggurat.kernels.activation import silu_and_mul_ref

    g = torch.Generator().manual_seed(inter)
    x = (torch.randn(3, 2 * inter, generator=g) * 3).to(DEV, dtype)
    got, ref = ET.silu_and_mul(x), silu_and_mul_ref(x)
    assert got.shape == (3, inter) and got.dtype == dtype
    # Same rounding steps as torch: bf16 agrees to an ulp (exp may differ in the last fp32 bit).
    assert torch.allclose(got.float(), ref.float(), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


def test_store_kv_skips_padding():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 16, generator=g).to(DEV), torch.randn(5, 2, 16, generator=g).to(DEV)
    kc, vc = (torch.full((4, 16, 2, 16), float("nan"), device=DEV) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([3, 17, -1, 63, 40], device=DEV)
    ET.store_kv(k, v, kc, vc, slots)
    kv_cache.store_kv_ref(k, v, kc2, vc2, slots)
    assert torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))


@pytest.mark.parametrize("splits", [1, 3])
def test_gumbel_sample(splits):
    """Greedy rows take the argmax; random rows follow softmax(x / T) (total
    variation against the exact distribution, 3000 draws: a temperature off by
    0.1 would be 0.078 away); -inf is never
    drawn; a row's draw depends on its seed only (not on the split count)."""
    from ziggurat.kernels.sampling import gumbel_sample_ref
    from ziggurat.kernels.sampling_triton import gumbel_sample

    g = torch.Generator().manual_seed(splits)
    v, b = 41, 3000
    x = torch.randn(v, generator=g) * 2
    x[[3, 17]] = float("-inf")
    logits = x.repeat(b, 1).to(DEV)
    t = torch.full((b,), 0.8, device=DEV)
    t[:7] = 0
    seeds = (torch.arange(b, dtype=torch.int64) * 1_000_003 + 11).to(DEV)
    seeds[::3] = -1  # these rows take base + row
    got = gumbel_sample(logits, t, 1 << 41, seeds, splits=splits).cpu()
    assert (got[:7] == x.argmax()).all()
    p = torch.softmax(x / 0.8, 0)
    for draws in (got[7:], gumbel_sample_ref(logits.cpu(), t.cpu(), 1 << 41, seeds.cpu())[7:]):
        freq = torch.bincount(draws, minlength=v).float() / len(draws)
        assert freq[3] == 0 and freq[17] == 0
        assert 0.5 * (freq - p).abs().sum() < 0.045
    keyed = torch.where(seeds >= 0, seeds, (1 << 41) + torch.arange(b, device=DEV))[:50]
    again = gumbel_sample(logits[:50].flip(0).contiguous(), t[:50].flip(0), 5, keyed.flip(0), splits=2).cpu()
    assert torch.equal(again.flip(0), got[:50])  # a row's key, not its place or the split, decides


def test_sampler_triton_path(monkeypatch):
    """The Sampler on the Triton path: seeded rows do not depend on the batch,
    top-k keeps its k tokens, greedy rows equal the argmax."""
    from ziggurat.models.sampler import Sampler, SamplingBatch
    from ziggurat.sampling_params import SamplingParams

    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    v = 50
    logits = torch.randn(4, v, generator=g).to(DEV)
    ps = [SamplingParams(temperature=0.9, seed=7), SamplingParams(temperature=0),
          SamplingParams(temperature=1.5, top_k=3), SamplingParams(temperature=1.2, top_p=0.5, min_p=0.1)]

    def draw(rows, sampler):
        b = SamplingBatch.build([ps[i] for i in rows], [[]] * len(rows), [[]] * len(rows), v, DEV)
        return sampler(logits[rows], b).token_ids.cpu().tolist()

    s = Sampler(seed=1)
    alone = draw([0], s)[0]
    assert draw([3, 1, 0], s)[2] == alone and draw([0, 2], Sampler(seed=5))[0] == alone
    assert draw([1, 0], s)[0] == int(logits[1].argmax())
    top3 = set(logits[2].topk(3).indices.tolist())
    assert {draw([2], s)[0] for _ in range(40)} <= top3


def test_sampler_triton_path_with_device_parameter_table(monkeypatch):
    """As the runner calls it: parameters gathered from the per-row device
    table (a strided gather, made contiguous), greedy rows mixed with T=1 rows
    and no filter: greedy rows stay exact argmax; a seeded row draws the same
    token whether or not a filtered row shares its batch."""
    from ziggurat.models.sampler import Sampler, SamplingBatch, sampling_row
    from ziggurat.sampling_params import SamplingParams

    monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
    g = torch.Generator().manual_seed(1)
    v = 64
    logits = torch.randn(8, v, generator=g).to(DEV)
    ps = [SamplingParams(temperature=1.0) if i % 2 == 0 else SamplingParams(temperature=0) for i in range(8)]
    ps[4] = SamplingParams(temperature=0.9, seed=11)
    table = torch.tensor([sampling_row(p) for p in ps] + [sampling_row(SamplingParams(top_p=0.5))],
                         dtype=torch.float32).to(DEV)

    def draw(rows, sampler):
        b = SamplingBatch.build([ps[i] if i < 8 else SamplingParams(top_p=0.5) for i in rows], [()] * len(rows),
                                [()] * len(rows), v, DEV, param_table=table,
                                param_rows=torch.tensor(rows, device=DEV))
        return sampler(logits[[min(i, 7) for i in rows]], b).token_ids.cpu().tolist()

    s = Sampler(seed=3)
    for _ in range(5):
        got = draw(list(range(8)), s)
        assert [got[i] for i in (1, 3, 5, 7)] == [int(logits[i].argmax()) for i in (1, 3, 5, 7)]
    alone = draw([4], s)[0]
    assert draw([4, 8], s)[0] == alone and draw([0, 4, 1], s)[1] == alone


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("n,k,config", [(37, 300, (8, 128, 4, 1)), (64, 256, (4, 128, 4, 1)), (5, 40, None)])
def test_gemv(m, n, k, config):
    from ziggurat.kernels.gemv_triton import gemv

    g = torch.Generator().manual_seed(n * m)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x, w, b = x.to(DEV), w.to(DEV), b.to(DEV)
    assert rel_err(gemv(x, w, config=config), x @ w.T) < 1e-5
    assert rel_err(gemv(x, w, b, config=config), x @ w.T + b) < 1e-5
    with pytest.raises(ValueError, match="gemv"):
        gemv(torch.randn(9, k, device=DEV), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k,config", [(37, 300, (8, 128, 4, 1)), (5, 40, None)])
def test_gated_gemv_equals_silu_and_mul_then_gemv(monkeypatch, dtype, m, n, k, config):
    """The down projection's fused prologue: silu(gate) * up as the GEMV's vector gives
    silu_and_mul then the GEMV bit for bit (same config, K not a multiple of BLOCK_K), for
    bf16 and FP8 weights; matmul.linear(gated=True) takes it at M <= 2 and equals the two ops."""
    from ziggurat.kernels import fp8_triton, matmul
    from ziggurat.kernels.activation import silu_and_mul_ref
    from ziggurat.kernels.fp8 import fp8_linear
    from ziggurat.kernels.gemv_triton import gemv

    g = torch.Generator().manual_seed(n * m)
    x = (torch.randn(m, 2 * k, generator=g) * 3).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype)
    fused = gemv(x, w, b, config, gated=True)
    assert torch.equal(fused, gemv(ET.silu_and_mul(x), w, b, config))
    exact = torch.nn.functional.linear(silu_and_mul_ref(x).float(), w.float(), b.float())
    assert rel_err(fused, exact) < (1e-5 if dtype == torch.float32 else 2e-2)
    w8 = torch.randn(n, k, generator=g).to(DEV, torch.float8_e4m3fn)
    s = (torch.rand(n, generator=g) + 0.5).to(DEV)
    assert torch.equal(fp8_triton.fp8_gemv(x, w8, s, b, config, gated=True),
                       fp8_triton.fp8_gemv(ET.silu_and_mul(x), w8, s, b, config))
    with pytest.raises(ValueError, match="gated"):
        gemv(x[:, :k], w, gated=True)
    if dtype == torch.bfloat16 and config is None:  # the dispatch (fp32 never takes the GEMV there)
        monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
        for mode in ("triton", "unfused", "cublas"):  # ZIGGURAT_GEMV's A/B: the same numbers
            monkeypatch.setenv("ZIGGURAT_GEMV", mode)
            assert torch.equal(matmul.linear(x, w, b, gated=True), matmul.linear(ET.silu_and_mul(x), w, b))
            assert torch.equal(matmul.linear(x, w8, None, s, gated=True), fp8_linear(ET.silu_and_mul(x), w8, s))
        monkeypatch.setenv("ZIGGURAT_GEMV", "cuBLAS")
        with pytest.raises(ValueError, match="ZIGGURAT_GEMV"):
            matmul.linear(x, w, b)


def test_gated_linear_off_the_gemv_path_is_silu_and_mul_then_matmul(monkeypatch):
    """Rows past GEMV_MAX_M (prefill), the torch reference and FP8's W8A8 path take the
    activation first: the same numbers as the two ops."""
    from ziggurat.kernels import matmul
    from ziggurat.kernels.activation import silu_and_mul
    from ziggurat.kernels.fp8 import fp8_linear

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 64, generator=g) * 3).to(DEV, torch.bfloat16)
    w = (torch.randn(48, 32, generator=g) / 6).to(DEV, torch.bfloat16)
    w8, s = w.float().to(torch.float8_e4m3fn), torch.ones(48, device=DEV)
    for kernels in ("triton", "torch"):
        monkeypatch.setenv("ZIGGURAT_KERNELS", kernels)
        for rows in (5, 2):
            xr = x[:rows]
            assert torch.equal(matmul.linear(xr, w, gated=True), matmul.linear(silu_and_mul(xr), w))
            assert torch.equal(fp8_linear(xr, w8, s, gated=True), fp8_linear(silu_and_mul(xr), w8, s))


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 32), (3, 1, 16), (8, 8, 64)])
def test_rotary_store_kv_fused(hq, hk, d):
    """The fused kernel equals rotary then store: rotated q/k returned, rotated k
    and v in their slots, padding (-1) slots untouched."""
    from ziggurat.models.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(d + hq)
    cache = RotaryEmbedding(d, 256, 10000.0, None).cos_sin_cache.to(DEV)
    qkv = torch.randn(5, (hq + 2 * hk) * d, generator=g).to(DEV)  # strided views, as in the model
    q = qkv[:, : hq * d].view(5, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(5, hk, d)
    v = qkv[:, (hq + hk) * d :].view(5, hk, d)
    pos = torch.tensor([0, 7, 100, 255, 3], device=DEV)
    slots = torch.tensor([3, 17, -1, 63, 40], device=DEV)
    kc, vc = (torch.full((4, 16, hk, d), float("nan"), device=DEV) for _ in range(2))
    kc2, vc2 = kc.clone(), vc.clone()
    q1, k1 = ET.rotary_store_kv(q, k, v, pos, cache, kc, vc, slots)
    q2, k2 = kv_cache.rotary_store_kv_ref(q, k, v, pos, cache, kc2, vc2, slots)
    assert rel_err(q1, q2) < 1e-6 and rel_err(k1, k2) < 1e-6
    assert torch.allclose(kc.nan_to_num(7.0), kc2.nan_to_num(7.0), atol=1e-6)
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    assert torch.isnan(kc.view(-1, hk, d)[[0, 1, 2]]).all()  # slots nobody wrote


@pytest.mark.slow
def test_engine_greedy_triton_path_equals_reference_path(model_factory, monkeypatch):
    from ziggurat import LLM, SamplingParams

    for arch in ("llama", "qwen3"):
        path = model_factory(arch)
        prompts = [[5, 6, 7, 8, 9] * 4, list(range(3, 40)), [11]]
        params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        monkeypatch.setenv("ZIGGURAT_KERNELS", "torch")
        ref = [o.outputs[0].token_ids for o in LLM(path, num_kv_blocks=64).generate(prompts, params)]
        monkeypatch.setenv("ZIGGURAT_KERNELS", "triton")
        got = [o.outputs[0].token_ids for o in LLM(path, num_kv_blocks=64).generate(prompts, params)]
        assert got == ref


@pytest.mark.parametrize("src_heads,dst_heads,src_lo,dst_lo,n", [(8, 8, 0, 0, 8), (8, 4, 4, 0, 4), (2, 8, 0, 6, 2)])
def test_kv_copy_kernel_equals_the_reference(src_heads, dst_heads, src_lo, dst_lo, n):
    """The one-launch block copy between caches (whole blocks and head ranges: TP re-sharding)."""
    from ziggurat.kernels.kv_copy_triton import copy_blocks
    from ziggurat.models.kv_blocks import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(0)
    mk = lambda h: [(torch.randn(10, 16, h, 128, generator=g).half(),  # noqa: E731
                     torch.randn(10, 16, h, 128, generator=g).half()) for _ in range(2)]
    src, dst = mk(src_heads), mk(dst_heads)
    ref = [(k.clone(), v.clone()) for k, v in dst]
    copy_blocks(src, dst, [3, 7, 0], [5, 1, 9], src_lo, dst_lo, n)
    scatter_blocks(ref, gather_blocks(src, [3, 7, 0], src_lo, n), [5, 1, 9], dst_lo)
    for (a, b), (c, d) in zip(dst, ref):
        assert torch.equal(a, c) and torch.equal(b, d)
    untouched = [i for i in range(10) if i not in (5, 1, 9)]
    assert torch.equal(dst[0][0][untouched], ref[0][0][untouched])


@pytest.mark.parametrize("src_heads,dst_heads,src_lo,dst_lo,n", [(8, 8, 0, 0, 8), (8, 4, 4, 0, 4)])
def test_kv_copy_kernel_with_spare_capacity_copies_only_its_blocks(src_heads, dst_heads, src_lo, dst_lo, n):
    """The graph-replayed launch: an id buffer of capacity 8 holding 3 blocks; the idle programs write nothing."""
    from ziggurat.kernels.kv_copy_triton import address_table, launch, pack_ids
    from ziggurat.models.kv_blocks import gather_blocks, scatter_blocks

    g = torch.Generator().manual_seed(1)
    mk = lambda h: [(torch.randn(12, 16, h, 128, generator=g).half(),  # noqa: E731
                     torch.randn(12, 16, h, 128, generator=g).half()) for _ in range(2)]
    src, dst = mk(src_heads), mk(dst_heads)
    ref = [(k.clone(), v.clone()) for k, v in dst]
    ids = pack_ids([3, 7, 0], [5, 1, 9], 8)
    launch(src, dst, src_lo, dst_lo, n, address_table(src, "cpu"), address_table(dst, "cpu"), ids, 8)
    scatter_blocks(ref, gather_blocks(src, [3, 7, 0], src_lo, n), [5, 1, 9], dst_lo)
    for (a, b), (c, d) in zip(dst, ref):
        assert torch.equal(a, c) and torch.equal(b, d)
    with pytest.raises(ValueError, match="capacity"):
        pack_ids(list(range(9)), list(range(9)), 8)


def test_kv_copy_kernel_grid_narrower_than_the_buffer():
    """KVSide's launch: a 64-capacity buffer, a grid of n programs per tensor, n larger
    than a token's row of elements (2 heads x 4) so the two cannot be confused."""
    from ziggurat.kernels.kv_copy_triton import address_table, launch, pack_ids

    g = torch.Generator().manual_seed(2)
    mk = lambda: [(torch.randn(24, 16, 2, 4, generator=g).half(),  # noqa: E731
                   torch.randn(24, 16, 2, 4, generator=g).half()) for _ in range(2)]
    src, dst = mk(), mk()
    src_ids, dst_ids = list(range(12)), list(range(23, 11, -1))
    before = [(k.clone(), v.clone()) for k, v in dst]
    launch(src, dst, 0, 0, 2, address_table(src, "cpu"), address_table(dst, "cpu"), pack_ids(src_ids, dst_ids, 64),
           64, len(src_ids))
    for (a, b), (c, d), (e, f) in zip(dst, src, before):
        assert torch.equal(a[dst_ids], c[src_ids]) and torch.equal(b[dst_ids], d[src_ids])
        assert torch.equal(a[:12], e[:12]) and torch.equal(b[:12], f[:12])
