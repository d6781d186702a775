"""Our forward pass against transformers' on the same directories (fp32, CPU).

Covers every architecture, tied and untied embeddings, GQA ratios, batched
mixed-length prefill, prompts split across chunked-prefill steps, and
prompts whose prefix comes from another request's cached blocks.
"""

from __future__ import annotations

import pytest
import numpy as np
import torch

from ziggurat import LLM, SamplingParams
from ziggurat.actors.scheduler.kv_manager import KVCacheManager
from ziggurat.models.config import ModelConfig
from ziggurat.models.runner import ModelRunner
from ziggurat.models.step import CachedRequestData, NewRequestData, StepInput

transformers = pytest.importorskip("transformers")

VARIANTS = [
    ("llama", dict()),  # untied, llama3 rope scaling
    ("llama", dict(tie_word_embeddings=True, num_kv_heads=1)),  # MQA
    ("mistral", dict(num_kv_heads=4)),  # MHA
    ("qwen2", dict()),  # qkv bias
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict()),  # q/k norm, explicit head_dim
    ("qwen3", dict(tie_word_embeddings=False, num_kv_heads=1)),
]
IDS = [f"{a}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for a, kw in VARIANTS]
BLOCK = 16
TOL = 1e-4


def hf_model(path, dtype=torch.float32):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 7, 45, 70)]


class Driver:
    """Runs a ModelRunner step by step and returns the logits of every
    scheduled token, with blocks managed by the real KVCacheManager."""

    def __init__(self, path, num_blocks=64, prefix_caching=True):
        self.cfg = ModelConfig.from_dir(path)
        self.runner = ModelRunner(self.cfg, torch.device("cpu"), BLOCK, max_model_len=512)
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=prefix_caching)
        self.computed: dict[str, int] = {}
        self.row: dict[str, int] = {}

    def step(self, chunks: dict[str, tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """chunks: rid -> (all prompt ids, tokens to run now). Returns rid -> logits [n, V]."""
        step = StepInput()
        for rid, (ids, n) in chunks.items():
            if rid not in self.computed:
                hit, num_hit = self.kv.get_computed_blocks(rid, ids)
                new = self.kv.allocate_slots(rid, ids, num_hit, n, hit)
                self.row[rid] = len(self.row)
                step.new_requests.append(NewRequestData(rid, self.row[rid], ids, [], SamplingParams(temperature=0),
                                                        self.kv.get_block_ids(rid), num_hit))
                self.computed[rid] = num_hit
            else:
                new = self.kv.allocate_slots(rid, ids, self.computed[rid], n)
                step.cached_requests.append(CachedRequestData(self.row[rid], new, self.computed[rid]))
            assert new is not None
        step.rows = np.asarray([self.row[rid] for rid in chunks], dtype=np.int32)
        step.num_tokens = np.asarray([n for _, n in chunks.values()], dtype=np.int32)
        r = self.runner
        r._update_states(step)
        input_ids, pos, meta, _ = r._eager_inputs(r._prepare(step))
        with torch.inference_mode():
            logits = r.model.compute_logits(r.model(input_ids, pos, meta)).float()
        out, at = {}, 0
        for rid, (_, n) in chunks.items():
            out[rid] = logits[at : at + n]
            at += n
            self.computed[rid] += n
            r.requests[self.row[rid]].num_computed = self.computed[rid]
        return out


@pytest.mark.parametrize("arch,kw", VARIANTS, ids=IDS)
def test_logits_match_transformers(model_factory, arch, kw):
    path = model_factory(arch, **kw)
    hf = hf_model(path)
    drv = Driver(path)
    prompts = prompts_for(drv.cfg.vocab_size)

    # 1. All prompts in one mixed batch.
    got = drv.step({f"a{i}": (p, len(p)) for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        ref = hf_logits(hf, p)
        assert (got[f"a{i}"] - ref).abs().max().item() <= TOL

    # 2. The longest prompt split across chunked-prefill steps (uneven chunks).
    p = prompts[-1]
    fresh = Driver(path, prefix_caching=False)
    parts, pieces = [], [13, 16, 30, len(p) - 59]
    for n in pieces:
        parts.append(fresh.step({"chunked": (p, n)})["chunked"])
    ref = hf_logits(hf, p)
    assert (torch.cat(parts) - ref).abs().max().item() <= TOL

    # 3. A prompt sharing 3 full blocks with an earlier one: the prefix comes
    #    from the cache and only the rest is computed.
    q = p[:48] + prompts[2][:20]
    got = drv.step({"hit": (q, len(q) - 48)})["hit"]
    assert drv.kv.get_block_ids("hit")[:3] == drv.kv.get_block_ids("a3")[:3]
    assert (got - hf_logits(hf, q)[48:]).abs().max().item() <= TOL


@pytest.mark.parametrize("arch,kw", [VARIANTS[i] for i in (0, 2, 3, 5)], ids=[IDS[i] for i in (0, 2, 3, 5)])
def test_greedy_generation_matches_transformers(model_factory, arch, kw):
    path = model_factory(arch, **kw)
    hf = hf_model(path)
    hf.generation_config.eos_token_id = None  # our side runs with ignore_eos
    llm = LLM(path, num_kv_blocks=128, max_num_batched_tokens=64)
    vocab = llm.engine.model_config.vocab_size
    prompts = prompts_for(vocab, seed=1) + [prompts_for(vocab, seed=2)[2]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=64, do_sample=False, pad_token_id=0
        )[0, len(p) :].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].finish_reason == "length"


def test_repetition_penalty_generation_matches_transformers(model_factory):
    """Greedy with repetition_penalty against HF generate: the workers keep the
    prompt mask and output counts on the device (PenaltyState) and bump them
    with each step's sampled tokens; async steps, a small cache (preempted
    requests resume with their outputs counted) and penalty-free neighbours."""
    path = model_factory("llama")
    hf = hf_model(path)
    hf.generation_config.eos_token_id = None
    llm = LLM(path, num_kv_blocks=10, max_num_batched_tokens=32)
    vocab = llm.engine.model_config.vocab_size
    prompts = prompts_for(vocab, seed=3)[1:]  # 7, 45, 70 tokens: 16 blocks by the end, 10 in the cache
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=r)
              for r in (1.3, 1.0, 2.0)]
    outs = llm.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        ids = torch.tensor([p])  # an explicit mask: HF would take prompt ids equal to pad_token_id for padding
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                          pad_token_id=0, repetition_penalty=sp.repetition_penalty)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
    assert llm.engine.scheduler.num_preemptions > 0
    llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1))  # carries the last finished ids over
    runner = llm.engine.executor.worker.runner
    assert sorted(runner.penalties.free) == list(range(runner.penalties.prompt.shape[0]))  # every row released


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close(model_factory, dtype):
    path = model_factory("qwen3", dtype=dtype)
    cfg = ModelConfig.from_dir(path)
    assert cfg.dtype == getattr(torch, dtype)
    hf = hf_model(path, dtype=getattr(torch, dtype))
    drv = Driver(path)
    p = prompts_for(cfg.vocab_size)[2]
    got = drv.step({"x": (p, len(p))})["x"]
    ref = hf_logits(hf, p)
    # Half precision: compare against the reference's own spread.
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
