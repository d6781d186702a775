"""Deferred sampling for structured outputs: a grammar request runs every step, its
next forward launched before its last token is accepted, its mask filled while that
forward runs (EngineCore.step, Scheduler.masks_for, ModelRunner.sample_deferred)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("xgrammar")

from ziggurat import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from ziggurat.actors.scheduler.engine import EngineCore  # noqa: E402
from ziggurat.config import EngineConfig  # noqa: E402

PATTERN = "(ab|cd|efg){6,12}x"


def _engine(model, **kw) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model), num_kv_blocks=256, device="cpu", **kw))


def _run(engine: EngineCore, reqs: dict[str, tuple[list[int], SamplingParams]]) -> tuple[dict, int]:
    for rid, (prompt, params) in reqs.items():
        engine.add_request(prompt, params, request_id=rid)
    """-> (each request's tokens, the step each got its last token in)."""
    tokens = {rid: [] for rid in reqs}
    last = {}
    steps = 0
    while engine.has_unfinished():
        ups = engine.step()
        steps += 1
        for rid, t in zip(ups.request_ids, ups.token_ids):
            tokens[rid].append(t)
            last[rid] = steps
        assert steps < 2000
    return tokens, last


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(str(llama_dir), num_kv_blocks=512) as llm:
        yield llm


def test_the_in_process_engine_defers(llama_dir):
    e = _engine(llama_dir)
    assert e.scheduler.defer_masks
    e.shutdown()
    e = _engine(llama_dir, async_scheduling=False)  # nothing runs ahead: masks go with each step
    assert not e.scheduler.defer_masks
    e.shutdown()


def test_grammar_rows_run_every_step_and_equal_the_undeferred_tokens(llama_dir):
    """Greedy: the same tokens with and without deferral, and with deferral a grammar
    request in a mixed batch runs every step (undeferred it waits a step per token, while
    the plain request keeps the engine running ahead)."""
    so = StructuredOutputsParams(regex=PATTERN)
    reqs = {"g0": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=64, structured_outputs=so)),
            "g1": ([9, 10, 11, 12], SamplingParams(temperature=0, max_tokens=64, structured_outputs=so)),
            "plain": ([3, 4], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))}
    got = {}
    for name, defer in (("deferred", True), ("undeferred", False)):
        e = _engine(llama_dir)
        e.scheduler.defer_masks = defer
        got[name] = _run(e, reqs)
        e.shutdown()
    (toks, last), (ref, ref_last) = got["deferred"], got["undeferred"]
    assert toks == ref
    assert len(toks["plain"]) == 80
    for g in ("g0", "g1"):
        n = len(toks[g])
        assert 14 <= n < 80  # at least 6 pairs + x + eos, done before the plain request
        assert last[g] <= n + 1, (g, last[g], n)  # a token every step
        assert ref_last[g] >= 2 * n - 2, (g, ref_last[g], n)  # undeferred: every other step


def test_sampled_tokens_obey_the_mask_of_their_own_step(llm):
    """Random sampling at a high temperature: every output matches the grammar, which
    holds only if each deferred mask reflects the token sampled just before it."""
    so = StructuredOutputsParams(regex=PATTERN)
    params = [SamplingParams(temperature=1.5, max_tokens=80, seed=s, structured_outputs=so) for s in range(12)]
    plain = [SamplingParams(temperature=1.0, max_tokens=30, seed=100 + s) for s in range(4)]
    prompts = [{"prompt_token_ids": [3 + i, 17, 29]} for i in range(16)]
    outs = llm.generate(prompts, params + plain, use_tqdm=False)
    assert llm.engine.scheduler.defer_masks
    texts = [o.outputs[0].text for o in outs[:12]]
    for t, o in zip(texts, outs[:12]):
        assert re.fullmatch(PATTERN, t), t
        assert o.outputs[0].finish_reason == "stop"
    assert len(set(texts)) > 3  # sampling, not one greedy path


def test_a_grammar_request_ending_while_the_next_step_runs(llm):
    """A grammar request that stops at token k was already scheduled for k+1: that
    step's mask leaves it out, its extra token is dropped, nothing leaks."""
    so = StructuredOutputsParams(choice=["abcabc", "xyz"])
    outs = llm.generate([{"prompt_token_ids": [7, 8]}] * 6,
                        [SamplingParams(temperature=1.0, seed=s, max_tokens=20, structured_outputs=so)
                         for s in range(6)], use_tqdm=False)
    for o in outs:
        assert o.outputs[0].text in ("abcabc", "xyz")
    e = llm.engine
    assert not e.scheduler.requests and e.kv.num_free_blocks == e.num_blocks
