"""Sampler: kernels against Hugging Face's warpers, statistics, seeding, logprobs."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ziggurat.kernels.sampling import (
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p_min_p,
    mask_tokens,
    sample,
)
from ziggurat.models.sampler import Sampler, SamplingBatch, mix_seed
from ziggurat.sampling_params import SamplingParams

DUMMY_IDS = torch.zeros(1, 1, dtype=torch.long)


def hf_filter(row: torch.Tensor, k: int | None, p: float | None, m: float | None) -> torch.Tensor:
    """One row [V] through HF's warpers in the order top-k, top-p, min-p."""
    x = row.unsqueeze(0)
    if k is not None and k > 0:
        x = TopKLogitsWarper(k)(DUMMY_IDS, x)
    if p is not None:
        x = TopPLogitsWarper(p)(DUMMY_IDS, x)
    if m is not None:
        x = MinPLogitsWarper(m)(DUMMY_IDS, x)
    return x.squeeze(0)


def random_params(gen: torch.Generator, B: int, V: int):
    ks = [-1, 0, 1, 2, 3, V // 2, V - 1, V, V + 7]
    ps = [1.0, 0.999, 0.95, 0.8, 0.5, 0.1, 1e-4]
    ms = [0.0, 0.01, 0.1, 0.5, 1.0]
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]
    return [pick(ks) for _ in range(B)], [pick(ps) for _ in range(B)], [pick(ms) for _ in range(B)]


SHAPES = [(1, 1), (1, 2), (3, 5), (7, 17), (16, 64), (5, 333), (4, 2048)]


@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("use", list(itertools.product([False, True], repeat=3)))
def test_filters_match_hf(B, V, use):
    use_k, use_p, use_m = use
    gen = torch.Generator().manual_seed(B * 1000 + V)
    logits = torch.randn(B, V, generator=gen) * 3
    ks, ps, ms = random_params(gen, B, V)
    top_k = torch.tensor(ks) if use_k else None
    top_p = torch.tensor(ps, dtype=torch.float32) if use_p else None
    min_p = torch.tensor(ms, dtype=torch.float32) if use_m else None
    k_eff = [k if 0 < k < V else V for k in ks]
    hints = [None, max(k_eff)] if use_k else [None]
    expected = torch.stack(
        [
            hf_filter(
                logits[i],
                ks[i] if use_k else None,
                ps[i] if use_p else None,
                ms[i] if use_m else None,
            )
            for i in range(B)
        ]
    )
    for hint in hints:
        before = logits.clone()
        got = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p, max_top_k=hint)
        assert torch.equal(logits, before), "input modified"
        assert torch.equal(got, expected), (hint, ks, ps, ms)
        assert torch.isfinite(got).any(dim=-1).all(), "a row lost every token"


@pytest.mark.parametrize("B,V", [(1, 2), (6, 40), (9, 1000)])
def test_top_k_only_topk_path_matches_hf(B, V):
    """Every row has 0 < k < V, so the max_top_k hint takes the torch.topk path."""
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=gen)
    ks = torch.randint(1, V, (B,), generator=gen)
    expected = torch.stack([hf_filter(logits[i], int(ks[i]), None, None) for i in range(B)])
    for hint in [int(ks.max()), None]:
        assert torch.equal(apply_top_k_top_p_min_p(logits, ks, None, None, max_top_k=hint), expected)


def test_top_k_keeps_ties_and_disabled_values():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]] * 4)
    top_k = torch.tensor([2, 0, -1, 6])
    got = apply_top_k_top_p_min_p(logits, top_k, None, None, max_top_k=6)
    inf = float("-inf")
    assert torch.equal(got[0], torch.tensor([inf, 3.0, 3.0, inf, 3.0, inf]))  # ties with the 2nd kept
    assert torch.equal(got[1:], logits[1:])  # 0, -1, V: off
    assert torch.equal(got[0], hf_filter(logits[0], 2, None, None))


def test_top_p_min_p_hand_cases():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3)
    logits = probs.log()
    got = apply_top_k_top_p_min_p(logits, None, torch.tensor([0.7, 0.9, 1e-9]), None)
    assert torch.isfinite(got).tolist() == [
        [True, True, False, False],  # 0.5 < 0.7 <= 0.5 + 0.3
        [True, True, True, False],  # 0.8 < 0.9 <= 0.95
        [True, False, False, False],  # 1 - p rounds to 1: the top token is still kept
    ]
    got = apply_top_k_top_p_min_p(logits, None, None, torch.tensor([0.5, 0.2, 0.0]))
    assert torch.isfinite(got).tolist() == [
        [True, True, False, False],  # p >= 0.25
        [True, True, True, False],  # p >= 0.1
        [True, True, True, True],  # off
    ]
    # top-p acts on the top-k-filtered (renormalised) distribution.
    got = apply_top_k_top_p_min_p(logits[:1], torch.tensor([2]), torch.tensor([0.6]), None)
    assert torch.isfinite(got).tolist() == [[True, False, False, False]]  # 0.5/0.8 = 0.625 >= 0.6
    got = apply_top_k_top_p_min_p(logits[:1], torch.tensor([2]), torch.tensor([0.65]), None)
    assert torch.isfinite(got).tolist() == [[True, True, False, False]]  # 0.625 < 0.65
    got = apply_top_k_top_p_min_p(logits[:1], torch.tensor([3]), torch.tensor([0.5]), None)
    assert torch.isfinite(got).tolist() == [[True, False, False, False]]  # 0.5/0.95 >= 0.5


def penalty_loop(logits, prompts, outputs, pres, freq, rep):
    out = logits.clone()
    for i in range(out.shape[0]):
        for t in set(prompts[i]) | set(outputs[i]):
            v = out[i, t]
            out[i, t] = v / rep[i] if v > 0 else v * rep[i]
        for t, c in Counter(outputs[i]).items():
            out[i, t] -= freq[i] * c
            out[i, t] -= pres[i]
    return out


def random_history(gen, B, V):
    prompts = [torch.randint(V, (int(torch.randint(0, 20, (1,), generator=gen)),), generator=gen).tolist() for _ in range(B)]
    outputs = [torch.randint(V, (int(torch.randint(0, 20, (1,), generator=gen)),), generator=gen).tolist() for _ in range(B)]
    return prompts, outputs


def masks_from(prompts, outputs, V):
    B = len(prompts)
    pm = torch.zeros(B, V, dtype=torch.bool)
    oc = torch.zeros(B, V, dtype=torch.int32)
    for i in range(B):
        pm[i, prompts[i]] = True
        for t in outputs[i]:
            oc[i, t] += 1
    return pm, oc


@pytest.mark.parametrize("B,V", [(1, 3), (4, 10), (9, 50), (3, 500)])
def test_repetition_penalty_matches_hf(B, V):
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=gen) * 2
    logits[:, 0] = 0.0  # the sign boundary
    prompts, outputs = random_history(gen, B, V)
    for i in range(B):
        prompts[i].append(0)
    reps = [0.5, 1.0, 1.3, 2.0, 1.1, 0.9, 1.7, 3.0, 1.0][:B]
    pm, oc = masks_from(prompts, outputs, V)
    zeros = torch.zeros(B)
    got = apply_penalties(logits, pm, oc, zeros, zeros, torch.tensor(reps))
    for i in range(B):
        ids = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        ref = RepetitionPenaltyLogitsProcessor(reps[i])(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i], ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("B,V", [(1, 4), (5, 20), (8, 300)])
def test_presence_frequency_repetition_match_loop(B, V):
    gen = torch.Generator().manual_seed(B + V)
    logits = torch.randn(B, V, generator=gen) * 2
    prompts, outputs = random_history(gen, B, V)
    pres = (torch.rand(B, generator=gen) * 4 - 2).tolist()
    freq = (torch.rand(B, generator=gen) * 4 - 2).tolist()
    rep = (torch.rand(B, generator=gen) * 1.5 + 0.5).tolist()
    pm, oc = masks_from(prompts, outputs, V)
    got = apply_penalties(logits, pm, oc, torch.tensor(pres), torch.tensor(freq), torch.tensor(rep))
    ref = penalty_loop(logits, prompts, outputs, pres, freq, rep)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)

    # SamplingBatch.build produces the same masks (and the same result end to end).
    params = [
        SamplingParams(presence_penalty=pres[i], frequency_penalty=freq[i], repetition_penalty=rep[i])
        for i in range(B)
    ]
    batch = SamplingBatch.build(params, prompts, outputs, V, "cpu")
    assert batch.needs_penalties
    assert torch.equal(batch.prompt_mask, pm)
    assert torch.equal(batch.output_counts, oc)
    assert batch.steps == [len(o) for o in outputs]


def test_build_skips_penalty_tensors_and_drops_out_of_range_ids():
    V = 10
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=3)]
    b = SamplingBatch.build(params, [[1, 2], [3]], [[4], []], V, "cpu")
    assert b.prompt_mask is None and b.output_counts is None and b.min_tokens_mask is None
    assert not b.needs_penalties and not b.all_greedy and not b.all_random
    assert b.needs_top_k and not b.needs_top_p and not b.needs_min_p and b.max_top_k == 3
    assert b.max_logprobs == -1 and b.seeded_rows == [] and b.num_unseeded_random == 1
    # Penalized row with ids beyond the logits' vocab (embedding larger than lm_head).
    b = SamplingBatch.build([SamplingParams(repetition_penalty=1.2)], [[1, 12]], [[9, 9, 15]], V, "cpu")
    assert b.prompt_mask[0].nonzero().flatten().tolist() == [1]
    assert b.output_counts[0, 9] == 2 and b.output_counts.sum() == 2


def test_temperature():
    logits = torch.randn(3, 7)
    t = torch.tensor([0.0, 0.5, 2.0])
    got = apply_temperature(logits, t)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], logits[0])
    torch.testing.assert_close(got[1], logits[1] / 0.5)
    torch.testing.assert_close(got[2], logits[2] / 2.0)


def test_exponential_race_matches_probs():
    gen = torch.Generator().manual_seed(1234)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0, 0.0])
    N = 200_000
    q = torch.empty(N, probs.numel()).exponential_(generator=gen)
    tokens = sample(probs.expand(N, -1), q)
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[6:].sum() == 0, "zero-probability token sampled"
    expected = probs[:6].double() * N
    chi2 = ((counts[:6] - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, chi2  # df = 5; P(chi2 > 25) ~ 1e-4
    # Unnormalised probs sample the same distribution.
    assert torch.equal(sample(probs.expand(N, -1) * 3.0, q), tokens)


def test_sampler_distribution_with_filters():
    """Unseeded rows through the full Sampler follow HF's processed distribution."""
    V, N = 12, 40_000
    gen = torch.Generator().manual_seed(7)
    row = torch.randn(V, generator=gen) * 2
    p = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05)
    batch = SamplingBatch.build([p] * N, [[]] * N, [[]] * N, V, "cpu")
    out = Sampler()(row.expand(N, V), batch, generator=gen)
    ref = hf_filter(row / 0.7, 8, 0.9, 0.05).softmax(-1).double()
    counts = torch.bincount(out.token_ids, minlength=V).double()
    assert counts[ref == 0].sum() == 0, "filtered token sampled"
    support = ref > 0
    assert support.sum() >= 3
    expected = ref[support] * N
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0, chi2


def test_greedy_rows_are_argmax_of_penalized_logits():
    V = 50
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=gen)
    top = logits.argmax(-1)
    # Row 1 is greedy with a repetition penalty on its argmax.
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=100.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, top_k=1, top_p=0.1),
        SamplingParams(temperature=0.5, seed=1),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
    ]
    outputs = [[], [int(top[1])], [], [], [], []]
    batch = SamplingBatch.build(params, [[]] * 6, outputs, V, "cpu")
    out = Sampler()(logits, batch, generator=gen)
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids[[0, 3, 5]].tolist() == top[[0, 3, 5]].tolist()
    second = logits[1].clone()
    second[top[1]] = float("-inf")
    assert int(out.token_ids[1]) == int(second.argmax())
    # All-greedy fast path, including bf16 input and T=0 (no NaN anywhere).
    gb = SamplingBatch.build([SamplingParams(temperature=0.0)] * 6, [[]] * 6, [[]] * 6, V, "cpu")
    assert gb.all_greedy and gb.prompt_mask is None
    out = Sampler()(logits.bfloat16(), gb)
    assert out.token_ids.tolist() == logits.bfloat16().float().argmax(-1).tolist()
    assert out.logprobs is None and out.topk_ids is None and out.ranks is None


@pytest.mark.parametrize("greedy", [True, False])
def test_min_tokens_forbids_eos_and_stop_ids(greedy):
    V, eos, stop = 20, 5, 7
    logits = torch.zeros(1, V)
    logits[0, eos] = 50.0
    logits[0, stop] = 49.0
    base = dict(temperature=0.0 if greedy else 1.0, min_tokens=3, max_tokens=10, stop_token_ids=[stop])
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler()

    def step(params, n_out):
        b = SamplingBatch.build([params], [[1, 2]], [[3] * n_out], V, "cpu")
        return int(sampler(logits, b, generator=gen).token_ids[0]), b

    p = SamplingParams(**base, _eos_token_ids=(eos,))
    for n in range(3):
        for _ in range(20):
            tok, b = step(p, n)
            assert tok not in (eos, stop)
        assert b.min_tokens_mask[0].nonzero().flatten().tolist() == [eos, stop]
    tok, b = step(p, 3)
    assert b.min_tokens_mask is None
    assert tok == eos  # allowed again (and overwhelmingly likely)
    # ignore_eos: EOS is not a stop token, so only stop ids are forbidden.
    p = SamplingParams(**base, ignore_eos=True, _eos_token_ids=(eos,))
    tok, b = step(p, 0)
    assert tok == eos
    assert b.min_tokens_mask[0].nonzero().flatten().tolist() == [stop]


def test_mask_tokens():
    logits = torch.randn(2, 4)
    mask = torch.tensor([[True, False, False, True], [False] * 4])
    got = mask_tokens(logits, mask)
    assert torch.isneginf(got[0, [0, 3]]).all()
    assert torch.equal(got[0, 1:3], logits[0, 1:3]) and torch.equal(got[1], logits[1])


def _flat_logits(V, seed):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_seeded_rows_independent_of_batch():
    V = 1000
    target = _flat_logits(V, 0)
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=42)
    outs_hist = [[1, 2, 3]]
    sampler = Sampler()

    alone = SamplingBatch.build([p], [[9]], outs_hist, V, "cpu")
    tok = int(sampler(target.unsqueeze(0), alone).token_ids[0])
    # Same row in mixed batches at different positions, with other generator states.
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, seed=42),  # same seed, different step
        SamplingParams(temperature=0.5, top_k=5, seed=7),
        SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=1.0),
    ]
    for pos in [0, 2, 5]:
        for gseed in [0, 1]:
            rows = others[:pos] + [p] + others[pos:]
            logits = torch.stack([_flat_logits(V, 100 + j) for j in range(len(rows))])
            logits[pos] = target
            hist = [[4] * (j + 1) for j in range(len(rows))]
            hist[pos] = outs_hist[0]
            b = SamplingBatch.build(rows, [[9]] * len(rows), hist, V, "cpu")
            gen = torch.Generator().manual_seed(gseed)
            assert int(sampler(logits, b, generator=gen).token_ids[pos]) == tok


def test_seeds_and_steps_vary_samples():
    V = 1000
    logits = _flat_logits(V, 1).unsqueeze(0)
    sampler = Sampler()

    def tok(seed, step):
        b = SamplingBatch.build([SamplingParams(seed=seed)], [[]], [[0] * step], V, "cpu")
        return int(sampler(logits, b).token_ids[0])

    assert tok(5, 3) == tok(5, 3)
    assert len({tok(s, 0) for s in range(20)}) >= 15
    assert len({tok(5, st) for st in range(20)}) >= 15
    # Seeds beyond 64 bits and negative seeds are accepted.
    assert tok(2**70 + 5, 0) == tok(2**70 + 5, 0)
    assert tok(-3, 0) == tok(-3, 0)


def test_mix_seed():
    vals = {mix_seed(s, t) for s in range(50) for t in range(50)}
    assert len(vals) == 2500
    assert all(0 <= v < 2**63 for v in vals)
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert 0 <= mix_seed(-1, 2**80) < 2**63


def test_unseeded_rows_use_generator():
    V, B = 1000, 16
    logits = torch.stack([_flat_logits(V, j) for j in range(B)])
    params = [SamplingParams()] * B
    b = SamplingBatch.build(params, [[]] * B, [[]] * B, V, "cpu")
    sampler = Sampler()
    a = sampler(logits, b, generator=torch.Generator().manual_seed(0)).token_ids
    a2 = sampler(logits, b, generator=torch.Generator().manual_seed(0)).token_ids
    c = sampler(logits, b, generator=torch.Generator().manual_seed(1)).token_ids
    assert torch.equal(a, a2)
    assert (a != c).sum() >= B // 2
    # Without a generator the global RNG is used.
    torch.manual_seed(11)
    g1 = sampler(logits, b).token_ids
    torch.manual_seed(11)
    assert torch.equal(sampler(logits, b).token_ids, g1)
    # A seeded-only batch does not consume the generator.
    sb = SamplingBatch.build([SamplingParams(seed=1)], [[]], [[]], V, "cpu")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    sampler(logits[:1], sb, generator=gen)
    assert torch.equal(gen.get_state(), state)


def test_logprobs_from_raw_logits():
    V, B = 64, 5
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(B, V, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0),
        SamplingParams(temperature=0.6, top_k=10, logprobs=5),
        SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[1], logprobs=0),
        SamplingParams(temperature=2.0, presence_penalty=1.5, seed=3),
        SamplingParams(temperature=0.0),
    ]
    outputs = [[int(logits[0].argmax())], [], [], [2, 2], []]
    b = SamplingBatch.build(params, [[3]] * B, outputs, V, "cpu")
    assert b.max_logprobs == 5
    out = Sampler()(logits, b, generator=gen)
    raw = logits.log_softmax(-1)
    ids = out.token_ids
    torch.testing.assert_close(out.logprobs, raw.gather(1, ids[:, None]).squeeze(1), rtol=0, atol=0)
    ref = raw.topk(5, dim=-1)
    assert torch.equal(out.topk_ids, ref.indices)
    torch.testing.assert_close(out.topk_logprobs, ref.values, rtol=0, atol=0)
    order = raw.argsort(dim=-1, descending=True)
    ranks = (order == ids[:, None]).float().argmax(-1) + 1
    assert out.ranks.tolist() == ranks.tolist()
    assert int(out.ranks[0]) == 2  # greedy row 0 avoided its raw argmax (penalty)
    # logprobs=0 only: sampled logprob and rank, empty top-k.
    b0 = SamplingBatch.build([SamplingParams(logprobs=0)], [[]], [[]], V, "cpu")
    o0 = Sampler()(logits[:1], b0, generator=gen)
    assert o0.topk_ids.shape == (1, 0) and o0.logprobs.shape == (1,) and int(o0.ranks[0]) >= 1


def test_penalty_state_equals_tensors_built_from_token_lists():
    """PenaltyState (device tables written once per request, bumped per step)
    gives the prompt mask and output counts SamplingBatch.build makes from the
    full token lists: slot reuse, growth, out-of-range ids included."""
    from ziggurat.models.sampler import PenaltyState

    V = 40
    g = torch.Generator().manual_seed(0)
    ps = PenaltyState(V, "cpu")
    hist = {}
    for k in range(7):  # grows past its first 4 slots
        prompt = torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist() + [V + 3]
        outs = torch.randint(0, V, (k,), generator=g).tolist()
        hist[ps.add(prompt, outs)] = (prompt, outs)
    ps.release(2)
    prompt2 = [1, 1, 5]
    del hist[2]
    hist[ps.add(prompt2, [7])] = (prompt2, [7])  # reuses slot 2
    for _ in range(5):
        slots = sorted(hist)
        toks = torch.randint(0, V, (len(slots),), generator=g)
        ps.bump(torch.tensor(slots), toks)
        for s_, t in zip(slots, toks.tolist()):
            hist[s_][1].append(t)
    slots = sorted(hist)
    mask, counts = ps.gather(torch.tensor(slots))
    ref = SamplingBatch.build([SamplingParams(repetition_penalty=1.2)] * len(slots), [hist[s_][0] for s_ in slots],
                              [hist[s_][1] for s_ in slots], V, "cpu")
    assert torch.equal(mask, ref.prompt_mask) and torch.equal(counts, ref.output_counts)
