"""The offline engine end to end on CPU: preemption, TP=2, seeding, stop
conditions, n, logprobs, prefix-cache accounting."""

from __future__ import annotations

import math

import pytest
import torch

from ziggurat import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, num_kv_blocks=256, max_num_batched_tokens=128)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_preemption_when_cache_is_too_small(llama_dir, llm):
    prompts = random_prompts(8, 1000, 20, 60, seed=3)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ample = tokens(llm.generate(prompts, params))
    # 8 requests need up to 7 blocks each at the end; 20 blocks cannot hold them all.
    small = LLM(llama_dir, num_kv_blocks=20, max_num_batched_tokens=64)
    got = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    assert tokens(got) == ample
    assert small.engine.kv.num_free_blocks == 20  # everything released


@pytest.mark.slow
def test_tensor_parallel_2_matches_tp1(llama_dir, llm):
    prompts = random_prompts(5, 1000, 3, 50, seed=4)
    ref = tokens(llm.generate(prompts, GREEDY))
    tp2 = LLM(llama_dir, tensor_parallel_size=2, num_kv_blocks=256, max_num_batched_tokens=128)
    try:
        assert tokens(tp2.generate(prompts, GREEDY)) == ref
        # Sampling on rank 0 with a seed gives the same draws as TP=1.
        p = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
        assert tokens(tp2.generate(prompts[:2], p)) == tokens(llm.generate(prompts[:2], p))
    finally:
        tp2.shutdown()


def test_seeded_sampling_is_independent_of_batch(llm):
    prompts = random_prompts(6, 1000, 5, 30, seed=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    alone = tokens(llm.generate([prompts[0]], seeded))[0]
    others = SamplingParams(temperature=0.8, top_k=50, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(prompts[1:3] + [prompts[0]] + prompts[3:], [others, others, seeded, others, others, others])
    assert mixed[2].outputs[0].token_ids == alone
    again = tokens(llm.generate([prompts[0]], seeded))[0]
    assert again == alone
    other_seed = tokens(llm.generate([prompts[0]], seeded.clone(seed=99)))[0]
    assert other_seed != alone


def test_sampling_parameters_follow_reused_worker_rows(llm):
    """The workers keep sampling parameters in a per-row device table written
    when a request arrives: rows freed by random-sampling requests and reused
    by greedy ones (in a batch that also samples randomly) must read the new
    request's parameters, not the old one's."""
    prompts = random_prompts(8, 1000, 5, 20, seed=9)
    hot = SamplingParams(temperature=5.0, top_k=3, max_tokens=3, ignore_eos=True)
    greedy_alone = tokens(llm.generate(prompts[:4], GREEDY))
    llm.generate(prompts[4:], hot)  # fills rows with temperature 5
    mixed = llm.generate(prompts[:4] + prompts[4:5], [GREEDY] * 4 + [hot])
    assert tokens(mixed[:4]) == greedy_alone
    runner = llm.engine.executor.worker.runner
    assert runner.param_table.shape[1] == 7 and not runner._param_diff


def test_n_samples_differ_and_share_the_prompt_cache(llm):
    p = random_prompts(1, 1000, 40, 40, seed=6)[0]
    out = llm.generate([p], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert len(set(seqs)) == 3 and all(len(s) == 12 for s in seqs)


def test_prefix_cache_hit_is_reported(llm):
    p = random_prompts(1, 1000, 100, 100, seed=8)[0]
    first = llm.generate([p], GREEDY)[0]
    second = llm.generate([p], GREEDY)[0]
    assert first.num_cached_tokens == 0
    # 100 tokens = 6 full blocks of 16; all 96 come from the cache.
    assert second.num_cached_tokens == 96
    assert tokens([second]) == tokens([first])


def test_max_tokens_stop_ids_and_min_tokens(llm):
    p = random_prompts(1, 1000, 10, 10, seed=9)[0]
    free_run = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop_id = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_id)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], ignore_eos=True))[0]
    c = out.outputs[0]
    assert c.token_ids == free_run.token_ids[: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    # min_tokens forbids the stop id before it is reached, so the path changes.
    late = llm.generate(
        [p], SamplingParams(temperature=0, max_tokens=30, min_tokens=first + 3, stop_token_ids=[stop_id], ignore_eos=True)
    )[0].outputs[0]
    assert len(late.token_ids) >= first + 3
    assert stop_id not in late.token_ids[: first + 3]


def test_eos_finishes_unless_ignored(llm):
    eos = llm.engine.model_config.eos_token_ids
    p = random_prompts(1, 1000, 10, 10, seed=10)[0]
    free_run = llm.generate([p], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    hits = [i for i, t in enumerate(free_run.token_ids) if t in eos]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    if hits:
        assert out.token_ids == free_run.token_ids[: hits[0] + 1] and out.finish_reason == "stop"
    else:
        assert out.token_ids == free_run.token_ids and out.finish_reason == "length"


def test_stop_strings_cut_the_text(llm):
    tok = llm.get_tokenizer()
    p = random_prompts(1, 1000, 12, 12, seed=12)[0]
    free_run = llm.generate([p], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    text = free_run.text
    assert text == tok.decode(free_run.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(free_run.token_ids)
    kept = llm.generate(
        [p], SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True, ignore_eos=True)
    )[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_logprobs(llm):
    p = random_prompts(1, 1000, 8, 8, seed=13)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for tok, step in zip(out.token_ids, out.logprobs):
        assert tok in step and len(step) in (3, 4)
        # Greedy: the sampled token is the most likely one.
        assert step[tok] == pytest.approx(max(step.values()))
        assert all(v <= 0 for v in step.values())
        total += step[tok]
    assert out.cumulative_logprob == pytest.approx(total)
    assert math.isfinite(out.cumulative_logprob)


def test_text_prompts_and_chat_template(llm):
    tok = llm.get_tokenizer()
    out = llm.generate(["Hello, world!", {"prompt": "café 日本語"}], SamplingParams(temperature=0, max_tokens=8))
    assert out[0].prompt_token_ids == tok.encode("Hello, world!")
    assert out[1].prompt == "café 日本語"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(ids, skip_special_tokens=False).startswith(tok.bos_token)


def test_failed_step_never_leaves_unwritten_blocks_in_the_prefix_cache(llama_dir):
    from ziggurat.actors.scheduler.engine import StepFailed

    llm = LLM(llama_dir, num_kv_blocks=64)
    p = random_prompts(1, 1000, 70, 70, seed=21)[0]
    real = llm.engine.executor.wait

    def boom(step):
        raise RuntimeError("worker died")

    llm.engine.executor.wait = boom
    with pytest.raises(StepFailed):
        llm.generate([p], GREEDY)
    llm.engine.executor.wait = real
    assert llm.engine.kv.num_free_blocks == 64 and llm.engine.kv.num_cached_blocks() == 0
    out = llm.generate([p], GREEDY)[0]
    assert out.num_cached_tokens == 0  # the blocks hashed for the failed step were forgotten
    assert tokens([out]) == tokens(LLM(llama_dir, num_kv_blocks=64).generate([p], GREEDY))


@pytest.mark.parametrize("async_", [False, True])
def test_a_launch_that_fails_loses_no_row_free(llama_dir, async_):
    """The step that fails to launch carries the row of a request that just
    finished; after the failure the workers must still be told to free it
    before the row holds someone else (they refuse a held row)."""
    from ziggurat.actors.scheduler.engine import StepFailed

    llm = LLM(llama_dir, num_kv_blocks=64)
    llm.engine.async_scheduling = async_
    ex = llm.engine.executor
    real, calls = ex.execute_async, [0]

    def flaky(step):
        calls[0] += 1
        if step.finished_rows and calls[0] < 100:
            calls[0] = 100  # fail once
            raise KeyboardInterrupt
        return real(step)

    ex.execute_async = flaky
    short, long = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), GREEDY
    with pytest.raises(StepFailed):
        llm.generate([[5, 6, 7], [5, 6, 8]], [short, long])
    assert calls[0] == 100
    prompts = random_prompts(3, 1000, 4, 20, seed=5)
    got = llm.generate(prompts, GREEDY)
    assert tokens(got) == tokens(LLM(llama_dir, num_kv_blocks=64).generate(prompts, GREEDY))
    # The workers hold no row but those whose free goes with the next step.
    assert set(ex.worker.runner.requests) <= set(llm.engine.scheduler._forget)


@pytest.mark.slow
def test_replies_of_abandoned_steps_never_reach_new_requests(llama_dir):
    """TP=2 in worker processes: a wait interrupted mid-run leaves replies in
    the pipe; the next requests must get their own tokens, not those."""
    from ziggurat.actors.scheduler.engine import StepFailed

    llm = LLM(llama_dir, num_kv_blocks=64, tensor_parallel_size=2)
    eng, ex = llm.engine, llm.engine.executor
    eng.async_scheduling = True
    real, n = ex.wait, [0]

    def interrupted(h):
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt
        return real(h)

    ex.wait = interrupted
    for p in ([11, 12, 13], [14, 15, 16]):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    with pytest.raises(StepFailed):
        for _ in range(5):
            eng.step()
    ex.wait = real
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    want = tokens(LLM(llama_dir, num_kv_blocks=64).generate(prompts, GREEDY))
    try:
        rids = [eng.add_request(p, GREEDY) for p in prompts]
        got = {r: [] for r in rids}
        for _ in range(200):  # bounded: stale replies used to stall the engine for good
            for u in eng.step():
                got[u.request_id] += u.new_token_ids
            if not eng.has_unfinished():
                break
        assert not eng.has_unfinished() and [got[r] for r in rids] == want
    finally:
        llm.shutdown()


def test_async_scheduling_gives_the_same_outputs(llama_dir):
    """Scheduling step N+1 before step N's tokens are known changes nothing a
    user sees: same tokens, finish reasons and stop handling, with a cache small
    enough to preempt, seeded sampling, eos, stop ids and max_tokens 1."""
    prompts = random_prompts(10, 1000, 5, 70, seed=31)
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=[1, 2, 30, 45][i % 4], min_tokens=1,
                             stop_token_ids=[7, 8, 9]) for i in range(10)]
    outs = {}
    for mode in (True, False):
        llm = LLM(llama_dir, num_kv_blocks=12, max_num_batched_tokens=64)
        llm.engine.async_scheduling = mode  # in-process too (off by default there: nothing overlaps)
        got = llm.generate(prompts, params)
        outs[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in got]
        assert llm.engine.kv.num_free_blocks == 12 and not llm.engine.has_unfinished()
        if mode:
            assert llm.engine.scheduler.num_preemptions > 0
    assert outs[True] == outs[False]
    assert {f for _, f, _ in outs[True]} >= {"length"}


@pytest.mark.parametrize("budget,blocks,caching,async_", [
    (16, 14, True, True),     # tiny chunks, heavy preemption
    (48, 20, False, True),    # no prefix cache
    (512, 400, True, False),  # everything at once, synchronous
    (33, 17, True, True),     # odd budget: chunks cross block boundaries
])
def test_outputs_do_not_depend_on_how_work_is_scheduled(llama_dir, llm, budget, blocks, caching, async_):
    """Greedy fp32 tokens must be the same whatever the step budget, cache size
    (preemption), prefix caching and async scheduling: shared prefixes, mixed
    lengths, eos, stop ids and max_tokens 1 included."""
    base = random_prompts(6, 1000, 20, 90, seed=41)
    prompts = base + [base[0][:40] + p[:10] for p in base[1:4]] + [base[2]]  # shared prefixes, a duplicate
    params = [SamplingParams(temperature=0, max_tokens=[1, 17, 40][i % 3], stop_token_ids=[5, 6])
              for i in range(len(prompts))]
    ref = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(prompts, params)]
    other = LLM(llama_dir, num_kv_blocks=blocks, max_num_batched_tokens=budget, enable_prefix_caching=caching)
    other.engine.async_scheduling = async_
    got = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in other.generate(prompts, params)]
    assert got == ref
    assert other.engine.kv.num_free_blocks == blocks


@pytest.mark.parametrize("max_batch", [3, 16])
def test_decode_through_graph_inputs_matches_eager(llama_dir, llm, max_batch):
    """Decode steps run through DecodeGraphs' padded static buffers (uncaptured
    on CPU: the same buffers, padding rows and GPU-side block-table gather,
    eager forward) give the eager path's tokens: batches above and below the
    largest bucket, preemption, seeded sampling and logprobs."""
    prompts = random_prompts(11, 1000, 5, 60, seed=7)
    params = [SamplingParams(temperature=[0, 0.8][i % 2], seed=i, max_tokens=20 + i, ignore_eos=True,
                             logprobs=2 if i % 3 == 0 else None) for i in range(11)]

    def run(graphs: bool):
        x = LLM(llama_dir, num_kv_blocks=40, max_num_batched_tokens=96)
        if graphs:
            runner = x.engine.executor.worker.runner
            runner.capture_decode_graphs(max_batch, capture=False)
            real_run = runner.graphs.run

            def counted(*a):
                used.append(len(a[0]))
                return real_run(*a)

            runner.graphs.run = counted
        outs = x.generate(prompts, params)
        return [(o.outputs[0].token_ids, [sorted(d.values()) for d in o.outputs[0].logprobs or []]) for o in outs], x

    used: list[int] = []
    ref, _ = run(False)
    got, x = run(True)
    assert used and max(used) <= max_batch and len(set(used)) > 1  # several bucket sizes replayed
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        assert len(a) == len(b)
        for x1, x2 in zip(a, b):
            assert x1 == pytest.approx(x2, abs=1e-4)
    assert x.engine.scheduler.num_preemptions > 0


def test_async_runner_feeds_pending_tokens_on_device(llama_dir):
    """In-process, the runner launches step N+1 before step N's tokens reach the
    host: N+1's inputs take them from the device. Same outputs as waiting for
    every step, with penalties (which settle the step in flight first), min_tokens,
    seeds, logprobs and chunked prefill mixed in."""
    prompts = random_prompts(9, 1000, 5, 80, seed=13)
    params = [SamplingParams(temperature=[0, 0.7, 1.0][i % 3], seed=i, max_tokens=12 + 3 * i, min_tokens=4,
                             repetition_penalty=1.3 if i % 4 == 1 else 1.0, presence_penalty=0.5 if i == 2 else 0.0,
                             logprobs=1 if i % 2 else None, stop_token_ids=[3]) for i in range(9)]
    got = {}
    for mode in (True, False):
        llm = LLM(llama_dir, num_kv_blocks=64, max_num_batched_tokens=48)
        llm.engine.async_scheduling = mode
        runner = llm.engine.executor.worker.runner
        feeds = []
        real = runner._feedback
        runner._feedback = lambda hs: (feeds.append(len(hs.feed_dst)), real(hs))[1]
        outs = llm.generate(prompts, params)
        got[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                      [sorted(d) for d in o.outputs[0].logprobs or []]) for o in outs]
        assert (sum(feeds) > 0) == mode  # the device feed is used exactly when steps overlap
        assert not any(r.pending for r in runner.requests.values())
    assert got[True] == got[False]


def test_warmup_leaves_no_trace(llama_dir):
    """The start-up warm-up forward (GPU workers run it to compile kernels)
    writes scratch KV into blocks nothing holds yet: outputs are unchanged, and
    once steps have run it refuses (cached prefixes could live in those blocks)."""
    prompts = random_prompts(4, 1000, 10, 300, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = LLM(llama_dir, num_kv_blocks=256, max_num_batched_tokens=128)
    warm = LLM(llama_dir, num_kv_blocks=256, max_num_batched_tokens=128)
    runner = warm.engine.executor.worker.runner
    runner.warmup()
    assert tokens(warm.generate(prompts, params)) == tokens(plain.generate(prompts, params))
    with pytest.raises(RuntimeError, match="before the first step"):
        runner.warmup()
