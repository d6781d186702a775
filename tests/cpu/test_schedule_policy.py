"""How a step's token budget is spent: decode_first (decodes, then a bounded prompt share
while anything decodes) against fcfs (admission order), on the scheduler alone and end to end."""

from __future__ import annotations

import numpy as np
import pytest

from ziggurat import LLM, SamplingParams
from ziggurat.actors.scheduler.kv_manager import KVCacheManager
from ziggurat.actors.scheduler.request import Request
from ziggurat.actors.scheduler.scheduler import Scheduler, SchedulerConfig
from ziggurat.config import ConfigError, EngineConfig
from ziggurat.models.step import StepOutput


def _scheduler(policy: str, budget: int = 256, max_prefill: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=budget, max_model_len=2048, policy=policy,
                          max_prefill_tokens=max_prefill)
    return Scheduler(cfg, KVCacheManager(1024, 16, enable_prefix_caching=False), default_eos_token_ids=(2,))


def _apply(s: Scheduler, step) -> None:
    """Every sampling row gets token 7."""
    rows = [r for r, n in step.scheduled() if s.running.reqs[s.running.row_pos[r]].num_pending]
    s.update_from_output(step, StepOutput(np.asarray(rows, np.int32), np.full(len(rows), 7, np.int32)))


def _decoding(s: Scheduler, k: int) -> None:
    """k requests past their prompts, decoding."""
    for i in range(k):
        s.add_request(Request(f"d{i}", [5] * 20, SamplingParams(max_tokens=500, ignore_eos=True)))
    _apply(s, s.schedule())
    assert len(s.running) == k and all(r.num_output_tokens == 1 for r in s.running.reqs[:k])


def _tokens_by_request(s: Scheduler, step) -> dict[str, int]:
    return {s.running.reqs[s.running.row_pos[r]].request_id: n for r, n in step.scheduled()}


def test_decode_first_bounds_prompt_tokens_while_requests_decode():
    s = _scheduler("decode_first")
    _decoding(s, 4)
    s.add_request(Request("long", [6] * 1000, SamplingParams(max_tokens=4, ignore_eos=True)))
    s.add_request(Request("short", [6] * 30, SamplingParams(max_tokens=4, ignore_eos=True)))
    seen_prompt = 0
    for _ in range(8):
        step = s.schedule()
        got = _tokens_by_request(s, step)
        assert all(got.get(f"d{i}") == 1 for i in range(4)), got  # every decode, every step
        prompt = sum(n for rid, n in got.items() if not rid.startswith("d"))
        assert prompt <= 64, got  # the prompt share, never the whole 256 budget
        seen_prompt += prompt
        _apply(s, step)
    assert seen_prompt == 8 * 64  # the share is used in full: the long prompt advances 64 a step


def test_decode_first_gives_prompts_the_whole_budget_when_nothing_decodes():
    s = _scheduler("decode_first")
    s.add_request(Request("long", [6] * 1000, SamplingParams(max_tokens=4, ignore_eos=True)))
    assert _tokens_by_request(s, s.schedule()) == {"long": 256}


def test_fcfs_gives_a_long_prompt_the_rest_of_the_budget():
    """The behaviour before, kept for A/B: decodes plus the remaining budget of prompt tokens."""
    s = _scheduler("fcfs")
    _decoding(s, 4)
    s.add_request(Request("long", [6] * 1000, SamplingParams(max_tokens=4, ignore_eos=True)))
    got = _tokens_by_request(s, s.schedule())
    assert got == {"d0": 1, "d1": 1, "d2": 1, "d3": 1, "long": 252}


def test_policies_give_the_same_greedy_tokens(llama_dir):
    prompts = [[3 + i] * (40 + 37 * i) for i in range(6)]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for policy in ("fcfs", "decode_first"):
        with LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=96, max_prefill_tokens=32,
                 schedule_policy=policy) as llm:
            outs[policy] = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert outs["fcfs"] == outs["decode_first"]


def test_the_settings_are_checked(llama_dir):
    with pytest.raises(ConfigError, match="schedule_policy"):
        EngineConfig(model=str(llama_dir), schedule_policy="lifo")
    with pytest.raises(ConfigError, match="max_prefill_tokens"):
        EngineConfig(model=str(llama_dir), max_prefill_tokens=0)
