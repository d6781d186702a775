"""LoRA adapters: logits against transformers + peft, batches mixing adapters, TP=2, the slot
and residency bookkeeping, and the adapter checks (fp32, CPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # peft imports triton: its language module must load in interpreter mode, as the Triton
    # kernel tests that run later in this process need (test_lora_triton.py, test_triton_kernels.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ziggurat import LLM, LoRARequest, SamplingParams
from ziggurat.actors.scheduler.lora import AdapterSlots
from ziggurat.actors.scheduler.request import Request
from ziggurat.models.config import ModelConfig
from ziggurat.models.lora import LoRAError, LoRALimits, SlotTable, check_adapter, read_adapter_config
from ziggurat.models.lora_maker import make_adapter
from ziggurat.models.runner import ModelRunner
from ziggurat.models.step import NewRequestData, StepInput

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def peft_adapter(model, out, r, targets, seed, alpha=None, rslora=False, name="default"):
    """A PEFT adapter saved by peft itself (random A and B: a fresh one has B = 0)."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), use_rslora=rslora,
                          lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out, selected_adapters=[name])
    return out / name if name != "default" else out


def runner_logits(runner: ModelRunner, prompts: list[list[int]], loras: list[LoRARequest | None]) -> list[torch.Tensor]:
    """One eager forward of all prompts in one batch, each with its adapter; logits per prompt."""
    bs = runner.block_size
    step, at = StepInput(), 0
    for row, (p, lr) in enumerate(zip(prompts, loras)):
        nb = -(-len(p) // bs)
        step.new_requests.append(NewRequestData(f"r{row}", row, p, [], SamplingParams(temperature=0, lora_request=lr),
                                                list(range(at, at + nb)), 0))
        at += nb
    step.rows = np.arange(len(prompts), dtype=np.int32)
    step.num_tokens = np.asarray([len(p) for p in prompts], dtype=np.int32)
    runner._update_states(step)
    hs = runner._prepare(step)
    ids, pos, meta, _ = runner._eager_inputs(hs)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(ids, pos, meta, runner.loras.batch(hs.lora_slots)))
    runner._update_states(StepInput(finished_rows=list(range(len(prompts)))))
    return list(logits.float().split([len(p) for p in prompts]))


CASES = [  # arch, model kwargs, adapter 1 (r, targets, rslora), adapter 2
    ("llama", {}, (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
     (4, ("q_proj", "v_proj"), True)),
    ("mistral", {"num_kv_heads": 4}, (16, ("k_proj", "o_proj", "down_proj"), False),
     (8, ("gate_proj", "up_proj", "v_proj"), False)),
    ("qwen2", {}, (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), True),
     (2, ("up_proj", "o_proj"), False)),
    ("qwen3", {}, (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
     (8, ("q_proj", "down_proj"), False)),
]


@pytest.mark.parametrize("arch,kw,first,second", CASES, ids=[c[0] for c in CASES])
def test_logits_match_peft(model_factory, tmp_path, arch, kw, first, second):
    path = model_factory(arch, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    a = peft_adapter(hf, tmp_path / "a", first[0], first[1], seed=1, rslora=first[2])
    pm = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(a)).eval()
    b = peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tmp_path / "b",
                     second[0], second[1], seed=2, rslora=second[2])
    pm.load_adapter(str(b), adapter_name="b")
    cfg = ModelConfig.from_dir(path)
    runner = ModelRunner(cfg, torch.device("cpu"), 16, 512, lora=LoRALimits(max_loras=3, max_rank=16,
                                                                            max_cpu_loras=3))
    runner.allocate_kv_cache(32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (23, 1, 40, 9)]
    la, lb = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    got = runner_logits(runner, prompts, [la, lb, None, la])

    def ref(p, adapter):
        with torch.no_grad():
            if adapter is None:
                with pm.disable_adapter():
                    return pm(torch.tensor([p])).logits[0]
            pm.set_adapter(adapter)
            return pm(torch.tensor([p])).logits[0]

    for p, adapter, out in zip(prompts, ["default", "b", None, "default"], got):
        want = ref(p, adapter)
        assert (out - want).abs().max().item() <= TOL
        if adapter is not None:  # the adapter does change the output
            base = ref(p, None)
            assert (want - base).abs().max().item() > 100 * TOL


def test_our_random_adapters_load_in_peft(model_factory, tmp_path):
    """lora_maker writes what peft reads (the benchmarks' adapters), and we agree with peft on them."""
    path = model_factory("llama")
    ad = make_adapter(path, tmp_path / "ours", rank=8, seed=3, scale=0.2)
    pm = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(ad)).eval()
    runner = ModelRunner(ModelConfig.from_dir(path), torch.device("cpu"), 16, 512, lora=LoRALimits(1, 8, 1))
    runner.allocate_kv_cache(8)
    p = list(range(5, 35))
    (got,) = runner_logits(runner, [p], [LoRARequest("x", 1, str(ad))])
    with torch.no_grad():
        assert (got - pm(torch.tensor([p])).logits[0]).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def adapters(model_factory, tmp_path_factory):
    path = model_factory("llama")
    root = tmp_path_factory.mktemp("adapters")
    return path, [LoRARequest(f"a{i}", i + 1, str(make_adapter(path, root / f"a{i}", rank=r, seed=i, scale=0.3)))
                  for i, r in enumerate((8, 16, 4, 8))]


def prompts_for(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, int(rng.integers(3, 40))).tolist() for _ in range(n)]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_mixed_batch_equals_each_alone(adapters):
    """4 adapters and the base in one batch: each request gets exactly the tokens it gets alone,
    also with fewer slots than adapters (the scheduler holds requests back until a slot frees)."""
    path, loras = adapters
    prompts = prompts_for(7, seed=1)
    which = [loras[0], loras[1], None, loras[2], loras[3], loras[0], None]
    alone = None
    for max_loras in (4, 2):
        llm = LLM(path, device="cpu", enable_lora=True, max_loras=max_loras, max_cpu_loras=max_loras + 1,
                  num_kv_blocks=256)
        try:
            if alone is None:
                alone = [tokens(llm.generate([p], GREEDY, lora_request=lr, use_tqdm=False))[0]
                         for p, lr in zip(prompts, which)]
                base = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
                assert sum(a != b for a, b, lr in zip(alone, base, which) if lr is not None) >= 4
                assert [a == b for a, b, lr in zip(alone, base, which) if lr is None] == [True, True]
            assert tokens(llm.generate(prompts, GREEDY, lora_request=which, use_tqdm=False)) == alone
            # The scheduler's mirror holds what the worker holds, slot for slot (once the workers
            # have freed the finished requests' rows: that goes with the next step).
            llm.generate([[1]], SamplingParams(max_tokens=1), use_tqdm=False)
            worker = llm.engine.executor.worker.runner.loras.table
            mirror = llm.engine.scheduler.loras.table
            assert (mirror.slot_key, list(mirror.cpu), mirror.refs) == (worker.slot_key, list(worker.cpu),
                                                                         worker.refs)
            names = {lr.key: lr.lora_name for lr in loras}
            assert llm.engine.resident_adapters() == sorted(names[k] for k in worker.resident())
            assert len(llm.engine.resident_adapters()) >= min(4, max_loras + 1)
        finally:
            llm.shutdown()


def test_prefix_cache_is_keyed_by_adapter(adapters):
    """The same prompt under two adapters and the base shares no KV: each equals its own cold run."""
    path, loras = adapters
    prompt = list(range(1, 65))  # four full blocks
    llm = LLM(path, device="cpu", enable_lora=True, max_loras=2, num_kv_blocks=256)
    try:
        cold = [tokens(llm.generate([prompt], GREEDY, lora_request=lr, use_tqdm=False))[0] for lr in loras[:2]]
        llm.engine.kv.reset_prefix_cache()
        outs = [llm.generate([prompt], GREEDY, lora_request=lr, use_tqdm=False)[0] for lr in (None, *loras[:2])]
        assert [o.outputs[0].token_ids for o in outs[1:]] == cold
        assert [o.num_cached_tokens for o in outs] == [0, 0, 0]
        again = llm.generate([prompt], GREEDY, lora_request=loras[1], use_tqdm=False)[0]
        assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == cold[1]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_tensor_parallel_2_equals_tp1(model_factory, tmp_path, kv_heads):
    path = model_factory("llama", num_kv_heads=kv_heads)
    loras = [LoRARequest(f"t{i}", i + 1, str(make_adapter(path, tmp_path / f"t{i}", rank=8 * (i + 1), seed=10 + i,
                                                          scale=0.3))) for i in range(2)]
    prompts = prompts_for(4, seed=kv_heads)
    which = [loras[0], None, loras[1], loras[0]]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    outs = {}
    for tp in (1, 2):
        llm = LLM(path, device="cpu", tensor_parallel_size=tp, enable_lora=True, max_loras=2, num_kv_blocks=128)
        try:
            outs[tp] = llm.generate(prompts, p, lora_request=which, use_tqdm=False)
        finally:
            llm.shutdown()
    assert tokens(outs[2]) == tokens(outs[1])
    lp = [[d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for tp in (1, 2)
          for o in outs[tp]]
    half = len(lp) // 2
    assert np.allclose(lp[:half], lp[half:], atol=1e-4)


# -- the slot table and the scheduler's cap -------------------------------------------------------


def test_slot_table_lru():
    t = SlotTable(num_slots=2, cpu_capacity=3)
    assert t.acquire("a") == (0, True, True, [])  # (slot, fill it, read the disk, dropped from host memory)
    assert t.acquire("b") == (1, True, True, [])
    assert t.acquire("a") == (0, False, False, [])  # in a slot already: shared
    t.release(0)
    t.release(0)
    assert t.acquire("c") == (0, True, True, [])  # a's slot is free; a stays in host memory
    t.release(1)
    assert t.acquire("d") == (1, True, True, ["b"])  # host memory holds 3: b is the least recently used
    with pytest.raises(RuntimeError, match="all 2 LoRA slots are in use"):
        t.acquire("a")
    t.release(0)
    assert t.acquire("a") == (0, True, False, [])  # back from host memory, no disk read
    assert t.resident() == {"a", "c", "d"}
    with pytest.raises(RuntimeError, match="released more often"):
        t.release(1), t.release(1)


def test_adapter_slots_cap_admission():
    from collections import deque

    slots = AdapterSlots(max_loras=2, max_cpu_loras=2)
    a, b, c = (LoRARequest(n, i + 1, f"/x/{n}") for i, n in enumerate("abc"))
    ra, rb, rc, ra2 = (Request(f"r{i}", [1, 2], SamplingParams(lora_request=lr)) for i, lr in enumerate((a, b, c, a)))
    base = Request("base", [1], SamplingParams())
    for r in (ra, rb):
        assert not slots.fits(r)  # cold: its read is asked for first, and it waits
        assert not slots.fits(r) and slots.prefetching  # asked once
        slots.staged_done([r.sampling_params.lora_request.key])
        assert slots.fits(r)
        slots.take(r)
    assert [lr.key for lr in slots.take_outbox()] == [a.key, b.key] and not slots.prefetching
    assert not slots.fits(rc)  # a third adapter
    assert slots.fits(ra2) and slots.fits(base)  # one already running; no adapter
    waiting = deque([rc, base, ra2])
    assert slots.first_fitting(waiting) and list(waiting) == [base, rc, ra2]
    waiting = deque([rc])
    assert not slots.first_fitting(waiting)
    slots.release(ra)
    assert not slots.fits(rc)  # room now, but c is read ahead first
    slots.staged_done([c.key])
    assert slots.fits(rc) and slots.active == 1
    assert slots.resident() == ["a", "b"]
    # With no room to read ahead (prefetch_cap reads asked for), a request is admitted and
    # its adapter read in its step, as without prefetch: nothing waits forever.
    full = AdapterSlots(max_loras=2, max_cpu_loras=1)
    rd, re_ = (Request(f"q{n}", [1], SamplingParams(lora_request=LoRARequest(n, 9 + i, f"/x/{n}")))
               for i, n in enumerate("de"))
    assert not full.fits(rd) and full.fits(re_)


def test_a_cold_adapter_is_read_while_the_others_decode(adapters, monkeypatch):
    """Its read (made slow here) runs on the workers' reader thread: no step waits for it, the
    streams decoding meanwhile get a token every step, and its request then gives the tokens it
    gives alone."""
    import gc
    import time

    from ziggurat.models import lora as lora_mod

    path, loras = adapters
    real = lora_mod.read_adapter

    def slow_read(*a, **kw):
        time.sleep(0.6)
        return real(*a, **kw)

    llm = LLM(path, device="cpu", enable_lora=True, max_loras=2, max_cpu_loras=2, num_kv_blocks=256)
    try:
        prompts = prompts_for(4, seed=5)
        want = tokens(llm.generate([prompts[0]], GREEDY, lora_request=loras[1], use_tqdm=False))[0]
        llm.engine.executor.worker.runner.loras.host.clear()  # forget it: the next use reads the disk again
        llm.engine.executor.worker.runner.loras.table.cpu.clear()
        llm.engine.scheduler.loras.table.cpu.clear()
        llm.generate([[1]], SamplingParams(max_tokens=1), use_tqdm=False)  # free the slot (rows go a step late)
        llm.engine.executor.worker.runner.loras.table.slot_key[:] = [None, None]
        llm.engine.scheduler.loras.table.slot_key[:] = [None, None]
        monkeypatch.setattr(lora_mod, "read_adapter", slow_read)
        e = llm.engine
        for i, p in enumerate(prompts[1:]):
            e.add_request(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), request_id=f"base{i}")
        for _ in range(3):
            e.step()
        e.add_request(prompts[0], GREEDY.clone(lora_request=loras[1]), request_id="cold")
        got, longest, base_tokens_before = [], 0.0, 0
        gc.collect()
        gc.disable()  # a collection of the suite's heap inside a step would look like a stall
        while e.has_unfinished():
            t = time.perf_counter()
            ups = e.step()
            longest = max(longest, time.perf_counter() - t)
            got += [tok for rid, tok in zip(ups.request_ids, ups.token_ids) if rid == "cold"]
            if not got:
                base_tokens_before += sum(rid.startswith("base") for rid in ups.request_ids)
        assert got == want
        # The streams kept decoding through the 0.6 s read (a step is ~10-50 ms here); read
        # in its step, the first token would follow the next step or two after the arrival.
        assert base_tokens_before >= 3 * 8, base_tokens_before
        assert longest < 0.45, longest  # no step waited for the read
        assert e.executor.worker.runner.loras.disk_reads == 2  # the first use and this one
    finally:
        gc.enable()
        llm.shutdown()


# -- adapter checks ------------------------------------------------------------------------------


def _adapter(tmp_path, path, **config):
    ad = make_adapter(path, tmp_path / "bad", rank=4, seed=0)
    f = ad / "adapter_config.json"
    c = json.loads(f.read_text())
    c.update(config)
    f.write_text(json.dumps(c))
    return ad


@pytest.mark.parametrize("field,value,says", [
    ("use_dora", True, "use_dora: DoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save: not supported"),
    ("bias", "all", "bias: adapters that train biases"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("target_modules", ["q_proj", "embed_tokens"], "target_modules: supported modules"),
    ("peft_type", "IA3", "peft_type: only LORA"),
    ("r", 0, "r: must be a positive integer"),
])
def test_unsupported_adapters_are_refused_by_field(model_factory, tmp_path, field, value, says):
    ad = _adapter(tmp_path, model_factory("llama"), **{field: value})
    with pytest.raises(LoRAError, match="adapter_config.json: " + says.replace("(", r"\(")):
        read_adapter_config(ad)


def test_bad_tensors_are_refused_naming_the_file(model_factory, tmp_path):
    from safetensors.torch import save_file

    path = model_factory("llama")
    ad = make_adapter(path, tmp_path / "t", rank=4, seed=0)
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 1024)},
              str(ad / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="adapter_model.safetensors: tensor 'base_model.model.model.embed_tokens"):
        check_adapter(ad, ModelConfig.from_dir(path))
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAError, match="adapter_model.safetensors: missing"):
        read_adapter_config(ad)


def test_offline_errors_name_the_adapter(adapters, qwen3_dir, tmp_path):
    path, loras = adapters
    big = LoRARequest("big", 9, str(make_adapter(path, tmp_path / "big", rank=32, seed=0)))
    llm = LLM(path, device="cpu", enable_lora=True, max_loras=1, max_lora_rank=16, num_kv_blocks=64)
    try:
        with pytest.raises(ValueError, match="lora_request: adapter 'big' has rank 32, above max_lora_rank=16"):
            llm.generate([[1, 2]], GREEDY, lora_request=big, use_tqdm=False)
        assert llm.engine.scheduler.requests == {}  # refused before anything was queued
        with pytest.raises(ValueError, match="lora_request: .*adapter_config.json: missing"):
            llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("gone", 3, str(tmp_path)), use_tqdm=False)
    finally:
        llm.shutdown()
    other = make_adapter(qwen3_dir, tmp_path / "qwen3", rank=4, seed=0)  # another base model's shapes
    llm = LLM(path, device="cpu", enable_lora=True, max_loras=1, num_kv_blocks=64)
    try:
        with pytest.raises(ValueError, match=r"k_proj.lora_B.weight' has shape \[64, 4\], the model needs "
                                             r"\[32, 4\] .*another base model"):  # tiny qwen3's head_dim is 32
            llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("q", 4, str(other)), use_tqdm=False)
    finally:
        llm.shutdown()
    plain = LLM(path, device="cpu", num_kv_blocks=64)
    try:
        with pytest.raises(ValueError, match="serves no LoRA adapters"):
            plain.generate([[1, 2]], GREEDY, lora_request=loras[0], use_tqdm=False)
    finally:
        plain.shutdown()


def test_decode_through_graph_inputs_equals_eager(adapters):
    """Decode steps through DecodeGraphs' static buffers (the LoRA tiles among them; on a CPU the
    graph is never captured and the same buffers run eagerly) give the eager path's tokens."""
    path, loras = adapters
    prompts = prompts_for(4, seed=7)
    which = [loras[0], None, loras[1], loras[0]]
    got = []
    for graphs in (False, True):
        llm = LLM(path, device="cpu", enable_lora=True, max_loras=3, num_kv_blocks=128)
        try:
            runner = llm.engine.executor.worker.runner
            if graphs:
                runner.capture_decode_graphs(8, capture=False)
                assert runner.graphs.lora is not None
            got.append(tokens(llm.generate(prompts, GREEDY, lora_request=which, use_tqdm=False)))
            if graphs:  # the decode steps went through the graph buffers: the last one's slots are there
                assert (runner.graphs.lora[:8] >= 0).any()
        finally:
            llm.shutdown()
    assert got[0] == got[1]


def test_base_only_decode_through_graph_inputs_skips_the_lora_ops(adapters, monkeypatch):
    """A LoRA engine's decode steps with no adapter run the base forward (the base graphs' path):
    no LoRA op runs, and the tokens are an engine without LoRA's."""
    from ziggurat.models import lora as lora_module

    path, _ = adapters
    prompts = prompts_for(3, seed=9)
    plain = LLM(path, device="cpu", num_kv_blocks=128)
    try:
        want = tokens(plain.generate(prompts, GREEDY, use_tqdm=False))
    finally:
        plain.shutdown()
    llm = LLM(path, device="cpu", enable_lora=True, max_loras=2, num_kv_blocks=128)
    try:
        llm.engine.executor.worker.runner.capture_decode_graphs(8, capture=False)
        calls = []
        real = lora_module.add_lora
        monkeypatch.setattr(lora_module, "add_lora", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()
    assert got == want and not calls


def test_a_failed_read_changes_no_slot(adapters, tmp_path):
    """A worker that cannot read an adapter (files gone since it was checked) fails that step
    naming the file, and its slot table is as before: nothing points at weights never written."""
    path, loras = adapters
    runner = ModelRunner(ModelConfig.from_dir(path), torch.device("cpu"), 16, 512, lora=LoRALimits(2, 16, 2))
    m = runner.loras
    gone = LoRARequest("gone", 7, str(tmp_path / "nowhere"))
    before = (list(m.table.slot_key), list(m.table.refs), list(m.table.cpu))
    with pytest.raises(LoRAError, match="nowhere: not a directory"):
        m.acquire(gone)
    assert (list(m.table.slot_key), list(m.table.refs), list(m.table.cpu)) == before
    b = LoRARequest("b", 7, loras[1].lora_path)
    assert m.acquire(loras[0]) == 0 and m.acquire(b) == 1
    assert m.disk_reads == 2 and set(m.host) == {loras[0].key, b.key}
