"""Prefill/decode hand-offs without Ray: two SchedulerLoops in one process, real
tiny-model engines, KV pulled between their caches ("local" transport).

Checks exactness against a mixed replica, prefix hits on the decode side,
metering (one event per request, cached tokens once, both replicas named),
and that cancellation or a failure at any point leaves no block held."""

from __future__ import annotations

import pytest

from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.loop import SchedulerLoop
from ziggurat.actors.scheduler.messages import SubmitRequest
from ziggurat.config import EngineConfig
from ziggurat.sampling_params import SamplingParams


class LocalPeers:
    """The actors' hand-off calls, made synchronously between loops of one process."""

    def __init__(self):
        self.loops: dict[int, SchedulerLoop] = {}
        self.calls = []

    def handoff(self, replica, h):
        self.calls.append(("handoff", replica, h.submit.request_id))
        res = self.loops[replica].accept_handoff(h)
        self.loops[h.prefill_replica].handoff_result(h.submit.request_id, res)

    def release(self, replica, rid):
        self.calls.append(("release", replica, rid))
        self.loops[replica].release_handoff(rid)


def engine(model, blocks=128, **kw):
    return EngineCore(EngineConfig(model=str(model), num_kv_blocks=blocks, device="cpu", dtype="float32",
                                   block_size=4, **kw))


class Cluster:
    """Replica 0: prefill; 1..: decode; `mixed`: a separate mixed replica for reference."""

    def __init__(self, model, decode=1, p_blocks=128, d_blocks=128, **kw):
        self.sent = []
        self.peers = LocalPeers()
        self.loops = []
        for r in range(1 + decode):
            eng = engine(model, p_blocks if r == 0 else d_blocks, **kw)
            lp = SchedulerLoop(eng, r, lambda ingress, batch: self.sent.append(batch), max_waiting=1000,
                               peers=self.peers, role="prefill" if r == 0 else "decode")
            lp.register_ingress("ing", "e1")
            self.peers.loops[r] = lp
            self.loops.append(lp)

    @property
    def prefill(self):
        return self.loops[0]

    def submit(self, rid, prompt, decode=1, max_tokens=12, **params):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **params)
        req = SubmitRequest(rid, list(prompt), sp, "ing", tenant="t", model="m", decode_replica=decode)
        assert self.prefill.submit(req).ok

    def pump(self, until=None, max_iters=2000):
        """Run every loop until `until()` holds (AssertionError if it never does), or max_iters rounds."""
        for _ in range(max_iters):
            for lp in self.loops:
                lp.run_once(idle_timeout=0.0)
            if until is not None and until():
                return
        if until is not None:
            raise AssertionError("did not get there")

    def tokens(self):
        out: dict[str, list[int]] = {}
        fin = {}
        for b in self.sent:
            for u in b.updates:
                out.setdefault(u.request_id, []).extend(u.new_token_ids)
                if u.finish_reason:
                    fin[u.request_id] = u.finish_reason
        return out, fin

    def held_blocks(self):
        return [lp.engine.kv.num_blocks - lp.engine.kv.num_free_blocks for lp in self.loops]

    def events(self):
        return [e for lp in self.loops for e in lp.usage.outbox]


def mixed_tokens(model, prompts, max_tokens=12):
    eng = engine(model)
    sent = []
    lp = SchedulerLoop(eng, 9, lambda ingress, batch: sent.append(batch), max_waiting=1000)
    lp.register_ingress("ing", "e1")
    for rid, p in prompts.items():
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        assert lp.submit(SubmitRequest(rid, list(p), sp, "ing", tenant="t", model="m")).ok
    while eng.has_unfinished() or lp.inbox:
        lp.run_once(idle_timeout=0.0)
    out = {}
    for b in sent:
        for u in b.updates:
            out.setdefault(u.request_id, []).extend(u.new_token_ids)
    return out


PROMPTS = {f"r{i}": [(7 * i + 3 * j) % 90 + 5 for j in range(n)] for i, n in enumerate([3, 4, 9, 16, 23, 40])}


def done(c, ids):
    return lambda: all(r in c.tokens()[1] for r in ids) and not any(
        lp.engine.scheduler.sending or lp.engine.scheduler.receiving for lp in c.loops)


def test_greedy_tokens_equal_a_mixed_replica_and_no_block_stays_held(llama_dir):
    c = Cluster(llama_dir)
    for rid, p in PROMPTS.items():
        c.submit(rid, p)
    c.pump(done(c, PROMPTS))
    got, fin = c.tokens()
    want = mixed_tokens(llama_dir, PROMPTS)
    assert got == want
    assert all(f == "length" for f in fin.values())
    assert c.held_blocks() == [0, 0]
    # Metering: one event per request, from the decode replica, naming the prefill one.
    ev = c.events()
    assert sorted(e.request_id for e in ev) == sorted(PROMPTS)
    assert all(e.replica == 1 and e.prefill_replica == 0 and e.completion_tokens == 12 for e in ev)
    assert {e.request_id: e.prompt_tokens for e in ev} == {r: len(p) for r, p in PROMPTS.items()}
    assert c.loops[1].transfers["count"] == len(PROMPTS)


def test_decode_side_prefix_hits_are_not_sent_and_cached_tokens_count_once(llama_dir):
    c = Cluster(llama_dir)
    base = list(range(10, 34))  # 24 tokens = 6 blocks of 4
    c.submit("a", base)
    c.pump(done(c, ["a"]))
    sent_a = c.loops[1].transfers["bytes"]
    c.submit("b", base + [50, 51, 52, 53, 54])  # shares 6 blocks, on both sides
    c.pump(done(c, ["a", "b"]))
    sent_b = c.loops[1].transfers["bytes"] - sent_a
    assert sent_b == sent_a // 6 * 2  # only the new tail's 2 blocks moved (of 8; a's were 6)
    got, _ = c.tokens()
    want = mixed_tokens(llama_dir, {"a": base, "b": base + [50, 51, 52, 53, 54]})
    assert got == want
    ev = {e.request_id: e for e in c.events()}
    assert ev["a"].cached_tokens == 0
    assert ev["b"].cached_tokens == 24  # the prefill side's hit, reported once
    assert c.held_blocks() == [0, 0]


def test_n2_and_two_decode_replicas(llama_dir):
    c = Cluster(llama_dir, decode=2)
    for i, (rid, p) in enumerate(PROMPTS.items()):
        for k in range(2):  # n=2: two samples of one prompt, on different decode replicas
            c.submit(f"{rid}-{k}", p, decode=1 + (i + k) % 2)
    ids = [f"{r}-{k}" for r in PROMPTS for k in range(2)]
    c.pump(done(c, ids))
    got, _ = c.tokens()
    want = mixed_tokens(llama_dir, PROMPTS)
    assert {r: got[f"{r}-{k}"] for r in PROMPTS for k in range(2)} == {r: want[r] for r in PROMPTS for k in range(2)}
    assert c.loops[1].transfers["count"] > 0 and c.loops[2].transfers["count"] > 0
    assert c.held_blocks() == [0, 0, 0]


class SlowPulls:
    """Wraps a decode engine's executor: pulls complete only when let go (or fail)."""

    def __init__(self, executor):
        self.inner, self.held, self.fail = executor, [], False
        self.go = False

    def kv_pull(self, pulls):
        h = {"pulls": pulls, "result": None}
        self.held.append(h)
        return h

    def kv_poll(self, h):
        if self.fail:
            raise RuntimeError("the prefill worker died")
        if not self.go:
            return None
        if h["result"] is None:
            h["result"] = self.inner.kv_pull(h["pulls"])
        return h["result"]

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_cancellation_at_any_point_frees_every_block_on_both_sides(llama_dir, when):
    c = Cluster(llama_dir)
    d = c.loops[1].engine
    slow = d.executor = SlowPulls(d.executor)
    c.submit("x", PROMPTS["r5"], max_tokens=40)
    if when == "before":  # the abort reaches the decode side before the hand-off
        c.loops[1].abort(["x"], "client_disconnected")
        c.prefill.abort(["x"], "client_disconnected")
        slow.go = True
    elif when == "during":
        c.pump(lambda: bool(slow.held))
        assert c.held_blocks()[0] > 0 and c.held_blocks()[1] > 0  # both sides hold it mid-transfer
        c.prefill.abort(["x"], "client_disconnected")
        c.loops[1].abort(["x"], "client_disconnected")
        c.pump(max_iters=5)
        assert c.held_blocks()[1] > 0  # the pull may still write: nothing freed under it
        slow.go = True
    else:
        slow.go = True
        c.pump(lambda: len(c.tokens()[0].get("x", [])) >= 3)
        c.prefill.abort(["x"], "client_disconnected")
        c.loops[1].abort(["x"], "client_disconnected")
    c.pump(lambda: c.held_blocks() == [0, 0] and not c.loops[1].engine.scheduler.requests
           and not c.prefill.engine.scheduler.requests)
    ev = c.events()
    assert [e.request_id for e in ev] == ["x"] and ev[0].status == "client_disconnected"


def test_a_failed_pull_ends_the_request_with_an_error_and_frees_both_sides(llama_dir):
    c = Cluster(llama_dir)
    d = c.loops[1].engine
    slow = d.executor = SlowPulls(d.executor)
    slow.fail = True
    c.submit("x", PROMPTS["r4"])
    c.pump(lambda: "x" in c.tokens()[1] and c.held_blocks() == [0, 0])
    toks, fin = c.tokens()
    assert fin["x"] == "error" and len(toks["x"]) == 1  # the first token had streamed
    assert [(e.request_id, e.status) for e in c.events()] == [("x", "error")]


def test_decode_death_frees_the_prefill_side(llama_dir):
    c = Cluster(llama_dir)
    d = c.loops[1].engine
    d.executor = SlowPulls(d.executor)  # never completes: the decode replica is gone mid-transfer
    c.submit("x", PROMPTS["r5"])
    c.pump(lambda: bool(c.prefill.engine.scheduler.sending) and bool(d.executor.held))
    c.prefill.peer_failed(1)  # the supervisor's notice
    c.pump(lambda: c.held_blocks()[0] == 0)
    assert not c.prefill.engine.scheduler.requests


def test_backpressure_and_the_deadline_on_the_decode_side(llama_dir):
    # The decode replica has room for one long prompt at a time.
    c = Cluster(llama_dir, d_blocks=14, kv_transfer_timeout_s=0.3)
    blocker = list(range(5, 45))  # 10 blocks + growth
    c.submit("a", blocker, max_tokens=8)
    c.submit("b", [i + 1 for i in blocker], max_tokens=8)
    c.pump(lambda: "a" in c.tokens()[1] and "b" in c.tokens()[1] and c.held_blocks() == [0, 0], max_iters=20000)
    _, fin = c.tokens()
    # One of them waited for room; both end (one may miss the 0.3 s deadline: cleanly, as an error).
    assert set(fin.values()) <= {"length", "error"} and "length" in fin.values()
    assert sorted(e.request_id for e in c.events()) == ["a", "b"]


def test_structured_output_across_the_hand_off(llama_dir):
    """The prefill side samples the first token under the grammar; the decode side
    rebuilds the grammar state from it and goes on: the output is what a mixed replica
    gives under the same constraint, and it matches."""
    import re

    pytest.importorskip("xgrammar")
    from ziggurat import StructuredOutputsParams

    so = StructuredOutputsParams(regex=r"[a-d]{3}-[0-9]{2,4}")
    c = Cluster(llama_dir)
    for rid, p in list(PROMPTS.items())[:3]:
        sp = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=so)
        assert c.prefill.submit(SubmitRequest(rid, list(p), sp, "ing", tenant="t", model="m", decode_replica=1)).ok
    ids = list(PROMPTS)[:3]
    c.pump(done(c, ids))
    got, fin = c.tokens()
    from ziggurat.models.tokenizer import Tokenizer

    t = Tokenizer(llama_dir)
    want = LLM_tokens(llama_dir, {r: PROMPTS[r] for r in ids}, so)
    for rid in ids:
        assert fin[rid] == "stop" and re.fullmatch(r"[a-d]{3}-[0-9]{2,4}", t.decode(got[rid])), t.decode(got[rid])
        assert got[rid] == want[rid]
    assert c.held_blocks() == [0, 0]


def LLM_tokens(model, prompts, so):
    from ziggurat import LLM

    with LLM(str(model), num_kv_blocks=128, block_size=4, dtype="float32") as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts.values()],
                            SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=so), use_tqdm=False)
    return {rid: o.outputs[0].token_ids for rid, o in zip(prompts, outs)}


def test_structured_output_survives_preemption(llama_dir):
    """A cache too small for every request at once: grammar requests are preempted and
    resumed (their grammar state kept), and each still matches its regex."""
    import re

    pytest.importorskip("xgrammar")
    from ziggurat import LLM, StructuredOutputsParams

    so = StructuredOutputsParams(regex=r"(ab|cd){4,12}")
    with LLM(str(llama_dir), num_kv_blocks=24, block_size=4, dtype="float32", max_model_len=96) as llm:
        outs = llm.generate([{"prompt_token_ids": [5 + i] * 30} for i in range(6)],
                            SamplingParams(max_tokens=40, temperature=0.8, seed=3, structured_outputs=so),
                            use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    for o in outs:
        assert re.fullmatch(r"(ab|cd){4,12}", o.outputs[0].text), o.outputs[0].text
