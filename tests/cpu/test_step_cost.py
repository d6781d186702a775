"""decode_first by time: the step-time fit (actors/scheduler/step_cost.py), the scheduler's prompt
share sized from it, and the engine timing its own steps, end to end in simulated time."""

from __future__ import annotations

import numpy as np
import pytest

from ziggurat import SamplingParams
from ziggurat.actors.scheduler.kv_manager import KVCacheManager
from ziggurat.actors.scheduler.request import Request
from ziggurat.actors.scheduler.scheduler import MIN_PREFILL_SHARE, Scheduler, SchedulerConfig
from ziggurat.actors.scheduler.step_cost import StepCostModel
from ziggurat.models.step import StepOutput

A, B, C, E = 4e-3, 25e-6, 10e-6, 30e-9  # a step's fixed, per prompt token, per decode row, per context token


def _true_seconds(p, d, ctx):
    return A + B * p + C * d + E * ctx


def test_fit_recovers_a_linear_step_time_and_sizes_the_share():
    m = StepCostModel()
    rng = np.random.default_rng(0)
    assert m.prompt_tokens_within(0.05, 10, 1000) is None  # nothing seen
    for _ in range(3):  # decode-only steps cannot tell the prompt term apart
        m.observe(0, 64, 40_000, _true_seconds(0, 64, 40_000))
    assert m.coefficients() is None
    for _ in range(60):
        p, d, ctx = int(rng.integers(0, 4000)), int(rng.integers(0, 256)), int(rng.integers(0, 300_000))
        m.observe(p, d, ctx, _true_seconds(p, d, ctx) * (1 + 0.02 * rng.standard_normal()))
    # 2% noise on steps of up to ~110 ms: the large terms are pinned, the small ones (a, c: a few
    # ms in all) only as far as the predictions need them.
    a, b, c, e = m.coefficients()
    assert b == pytest.approx(B, rel=0.05) and e == pytest.approx(E, rel=0.2)
    for shape in [(0, 1, 100), (0, 256, 300_000), (2048, 128, 100_000), (4000, 0, 0)]:
        assert m.predict(*shape) == pytest.approx(_true_seconds(*shape), abs=1.5e-3)
    share = m.prompt_tokens_within(0.060, 200, 200_000)
    assert share == pytest.approx((0.060 - _true_seconds(0, 200, 200_000)) / B, rel=0.06)
    assert m.prompt_tokens_within(0.005, 256, 3_000_000) == 0  # the decodes alone fill the target


def test_bad_timings_are_ignored_and_a_nonphysical_fit_answers_none():
    m = StepCostModel()
    for x in (0.0, -1.0, float("nan"), float("inf")):
        m.observe(1000, 1, 10, x)
    assert m.observations == 0
    for p in (1000, 2000, 3000, 4000, 5000):  # more prompt tokens, faster: no physical share
        m.observe(p, 0, 0, 0.1 - p * 1e-5)
    assert m.coefficients()[1] < 0 and m.prompt_tokens_within(0.05, 0, 0) is None


def _apply(s: Scheduler, step) -> None:
    rows = [r for r, n in step.scheduled() if s.running.reqs[s.running.row_pos[r]].num_pending]
    s.update_from_output(step, StepOutput(np.asarray(rows, np.int32), np.full(len(rows), 7, np.int32)))


def test_scheduler_sizes_prompt_share_from_the_fit():
    """Steps timed by the linear model above: once the fit is ready every step's prompt share is
    what fits beside its decodes within the 30 ms target (never below MIN_PREFILL_SHARE); before,
    it is max_prefill_tokens."""
    cfg = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=4096, policy="decode_first",
                          max_prefill_tokens=512, target_step_s=0.030)
    s = Scheduler(cfg, KVCacheManager(8192, 16, enable_prefix_caching=False), default_eos_token_ids=(2,))
    for i in range(8):
        s.add_request(Request(f"d{i}", [5] * 100, SamplingParams(max_tokens=10_000, ignore_eos=True)))
    for i in range(40):
        s.add_request(Request(f"p{i}", [6] * 3000, SamplingParams(max_tokens=10_000, ignore_eos=True)))
    shares, fitted = [], []
    for _ in range(40):
        step = s.schedule()
        n = step.num_tokens
        d, p = int((n == 1).sum()), int(n[n > 1].sum())
        ctx = s._shapes[step.step_id][2]
        shares.append(p)
        fitted.append(s.step_cost.coefficients() is not None)
        s.step_timed(step.step_id, _true_seconds(p, d, ctx))
        _apply(s, step)
    assert shares[1] <= 512  # before the fit: the fixed share
    assert fitted[-1]
    last = s.schedule()
    n = last.num_tokens
    d, p, ctx = int((n == 1).sum()), int(n[n > 1].sum()), s._shapes[last.step_id][2]
    want = (0.030 - _true_seconds(0, d, ctx)) / B
    assert p == pytest.approx(max(MIN_PREFILL_SHARE, want), rel=0.03) and p > 512  # more than the fixed share
    assert _true_seconds(p, d, ctx) == pytest.approx(0.030, rel=0.03)


def test_engine_holds_steps_at_the_target_in_simulated_time():
    """The real engine on scripts/sim_schedule.py's simulated H200 clock: with target_step_ms the
    steps (after the first few, before the fit) last the target and the tail ITL follows; a fixed
    2,048-token share overshoots it on this workload."""
    import argparse

    from ziggurat.scripts.sim_schedule import StepTimeModel, run

    args = argparse.Namespace(num_prompts=64, input_len=1024, output_len=64, rate=float("inf"), max_num_seqs=256,
                              max_num_batched_tokens=8192, num_kv_blocks=8192, seed=0)
    fixed = run("decode_first:2048", args, StepTimeModel())
    timed = run("decode_first@40", args, StepTimeModel())
    assert fixed["itl_p90_ms"] > 55  # 2,048 prompt tokens beside the decodes: ~62 ms steps
    assert timed["itl_p90_ms"] == pytest.approx(40, rel=0.03)
    assert timed["output_tok_s"] > 0.9 * fixed["output_tok_s"]
