"""Randomized scheduling test: EngineCore, sync and async, against a fake
worker built on the real ModelRunner._update_states/_prepare (persistent block
table, slot mapping), a simulated KV cache that checks that every position a
request attends to holds that request's own (token, position), and a
deterministic "model" (next token = hash of the history, sometimes EOS).

Each trial varies block size, max_model_len, step budget, cache size (heavy
preemption), prefix caching, max_num_seqs, max_tokens/min_tokens/stop ids/
ignore_eos and random aborts, and requires identical outputs in every setting,
no skipped or duplicated token, limits respected, every block free at the
end and no stale request state left on the worker."""
import hashlib
import random

import numpy as np
import torch

from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.config import EngineConfig
from ziggurat.models.runner import ModelRunner
from ziggurat.models.staging import Staging
from ziggurat.models.step import StepOutput
from ziggurat.sampling_params import SamplingParams

import pytest

MODEL = None  # set by the fixture: any model dir (only its config is read)
EOS = 1001


def next_token(hist):
    h = int.from_bytes(hashlib.blake2b(repr(tuple(hist)).encode(), digest_size=8).digest(), "little")
    v = h % 60
    return EOS if v == 0 else 10 + v


class TP:
    size, rank, group = 1, 0, None


class FakeRunner(ModelRunner):
    def __init__(self, block_size, max_model_len, num_blocks):
        self.block_size = block_size
        self.device = torch.device("cpu")
        self.tp = TP()
        self.requests = {}
        self.block_table = np.zeros((4, (max_model_len + block_size - 1) // block_size), dtype=np.int32)
        self.device_table = torch.from_numpy(self.block_table.copy())
        self._table_diff = []
        self.staging = Staging(self.device)
        self.param_table = torch.zeros(4, 7)
        self._param_diff = {}
        self._num_biased = 0  # requests with a logit_bias (ModelRunner keeps the count)
        self.loras, self._num_lora = None, 0  # no LoRA (ModelRunner's adapter slots and count)
        self.kv_tok = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.kv_pos = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.num_blocks = num_blocks
        self.recent_freed, self.row_bound = [], 0

    def execute(self, step):
        self._update_states(step)
        assert all(r.row == s for s, r in self.requests.items())
        # Rows are reused: none is ever above what was held at once plus what
        # was freed in the last few steps (a freed row cools while steps that
        # may carry it are in flight).
        self.recent_freed = (self.recent_freed + [len(step.finished_rows)])[-3:]
        self.row_bound = max(self.row_bound, len(self.requests) + sum(self.recent_freed))
        assert max(self.requests, default=-1) < self.row_bound, "rows are not reused"
        if step.is_empty:
            return StepOutput()
        hs = self._prepare(step)
        slots = hs.slot_mapping
        assert (slots >= 0).all() and (slots < self.num_blocks * self.block_size).all()
        self.kv_tok[slots] = hs.ids
        self.kv_pos[slots] = hs.positions
        # Reads go through the device mirror, kept current by per-step diffs only.
        self._apply_table_diff()
        bt = self.device_table[torch.from_numpy(hs.rows)].numpy()
        bs = self.block_size
        for i, rid in enumerate(step.rows.tolist()):
            r = self.requests[rid]
            L = int(hs.seq_lens[i])
            assert (L + bs - 1) // bs <= r.num_blocks, (rid, L, r.num_blocks)
            for p in range(L):
                s = bt[i, p // bs] * bs + p % bs
                if self.kv_tok[s] != r.token_ids[p] or self.kv_pos[s] != p:
                    raise AssertionError(f"garbage KV read: {rid} pos {p} slot {s}: "
                                         f"has ({self.kv_tok[s]},{self.kv_pos[s]}) want ({r.token_ids[p]},{p})")
        self._advance(step)
        toks = []
        for r in hs.sample_reqs:
            t = next_token(r.token_ids)
            r.token_ids.append(t)
            toks.append(t)
        return StepOutput(hs.sample_rows, np.asarray(toks, dtype=np.int32))


class Exec:
    bs = 16
    nblocks = 64
    mml = 2048

    def __init__(self, cfg, max_len):
        self.cfg = cfg
        self.max_len = max_len

    def determine_num_blocks(self):
        return self.cfg.num_kv_blocks

    def initialize_cache(self, n):
        self.r = FakeRunner(self.cfg.block_size, self.max_len, n)

    def execute_async(self, step):
        return step

    def wait(self, step):
        return self.r.execute(step)

    def shutdown(self):
        pass


def run(prompts, params, *, async_, blocks, budget, caching, mml=None, aborts=None, seqs=256, bs=16, seed=0):
    cfg = EngineConfig(model=MODEL, num_kv_blocks=blocks, max_num_batched_tokens=budget, enable_prefix_caching=caching,
                       async_scheduling=async_, device="cpu", block_size=bs, max_model_len=mml, max_num_seqs=seqs)
    eng = EngineCore(cfg, executor_factory=Exec)
    outs = {}
    fins = {}
    ids = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        rid = eng.add_request(p, sp, request_id=f"r{i}")
        ids.append(rid)
        outs[rid] = []
    rng = random.Random(seed)
    nsteps = 0
    while eng.has_unfinished():
        for u in eng.step():
            assert u.request_id not in fins, f"update after finish for {u.request_id}"
            outs[u.request_id] += u.new_token_ids
            if u.finish_reason:
                fins[u.request_id] = (u.finish_reason, u.stop_reason)
        nsteps += 1
        if aborts and rng.random() < aborts:
            live = [r for r in ids if r not in fins]
            if live:
                victim = rng.choice(live)
                for req in eng.abort([victim]):
                    fins[victim] = ("abort", None)
        assert nsteps < 100000
    assert eng.kv.num_free_blocks == blocks, (eng.kv.num_free_blocks, blocks)
    eng.add_request([20, 21], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), request_id="flush")
    while eng.has_unfinished():
        eng.step()
    stale = set(eng.executor.r.requests) - set(eng.scheduler._forget)
    assert not stale, f"worker holds stale requests {stale}"
    assert eng.kv.num_free_blocks == blocks
    return eng, outs, fins


def check_chain(prompts, params, outs, fins, mml):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        o = outs[rid]
        fr = fins.get(rid)
        hist = list(p)
        for k, t in enumerate(o):
            assert t == next_token(hist), f"{rid}: token {k} wrong (skipped/duplicated?)"
            hist.append(t)
        if fr[0] == "abort":
            continue
        mt = sp.max_tokens if sp.max_tokens is not None else 10**9
        assert len(o) <= mt and len(p) + len(o) <= mml, (rid, len(o), mt)


@pytest.fixture(autouse=True)
def _model(llama_dir):
    global MODEL
    MODEL = str(llama_dir)


@pytest.mark.parametrize("trial", range(24))
def test_random_schedules(trial):
    rng = random.Random(trial)
    bs = rng.choice([4, 8, 16])
    mml = rng.choice([64, 128, 256])
    base = [[rng.randrange(10, 900) for _ in range(rng.randrange(1, mml - 1))] for _ in range(4)]
    prompts = []
    for i in range(rng.randrange(2, 12)):
        b = rng.choice(base)
        cut = rng.randrange(1, len(b) + 1)
        prompts.append(b[:cut] + [rng.randrange(10, 900) for _ in range(rng.randrange(0, 10))])
    prompts = [p[: mml - 1] for p in prompts]
    params = []
    for p in prompts:
        mt = rng.choice([None, 1, 2, 3, 5, 20, 200])
        mn = rng.choice([0, 0, 1, 3])
        if mt is not None:
            mn = min(mn, mt)
        params.append(SamplingParams(temperature=0, max_tokens=mt, min_tokens=mn,
                                     stop_token_ids=rng.choice([[], [11, 12], [13]]),
                                     ignore_eos=rng.random() < 0.2))
    min_blocks = (mml + bs - 1) // bs
    ref = None
    for async_ in (False, True):
        for blocks, budget, caching in [(min_blocks * 8, 4096, True), (min_blocks, rng.choice([7, 16, 33]), True),
                                        (min_blocks + 3, rng.choice([5, 64]), False),
                                        (min_blocks + 1, rng.choice([1, 2, 9]), True)]:
            try:
                eng, outs, fins = run(prompts, params, async_=async_, blocks=blocks, budget=budget,
                                      caching=caching, mml=mml, bs=bs, seqs=rng.choice([1, 3, 256]))
                check_chain(prompts, params, outs, fins, eng.max_model_len)
            except Exception as e:
                print(f"trial {trial} async={async_} blocks={blocks} budget={budget} caching={caching} "
                      f"bs={bs} mml={mml}: {type(e).__name__}: {e}")
                raise
            got = (outs, fins)
            if ref is None:
                ref = got
            elif got != ref:
                for k in outs:
                    if (outs[k], fins.get(k)) != (ref[0][k], ref[1].get(k)):
                        print("DIFF", trial, async_, blocks, budget, caching, k, len(outs[k]), fins.get(k),
                              len(ref[0][k]), ref[1].get(k), params[int(k[1:])].max_tokens, len(prompts[int(k[1:])]))
                pytest.fail(f"trial {trial}: outputs differ")
    # aborts
    for async_ in (False, True):
        eng, outs, fins = run(prompts, params, async_=async_, blocks=min_blocks + 2, budget=16, caching=True,
                              mml=mml, bs=bs, aborts=0.2, seed=trial)
        check_chain(prompts, params, outs, fins, eng.max_model_len)
