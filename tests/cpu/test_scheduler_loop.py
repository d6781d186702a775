"""SchedulerLoop (the scheduler actor's logic) without Ray: metering of every
ending, failures, ingress restarts, n>1 billing."""

from __future__ import annotations

import time

import pytest

from ziggurat.actors.scheduler.engine import EngineCore, StepFailed
from ziggurat.actors.scheduler.messages import SubmitRequest, SubmitResult
from ziggurat.actors.scheduler.loop import SchedulerLoop
from ziggurat.config import EngineConfig
from ziggurat.models.null_worker import NullWorker
from ziggurat.sampling_params import SamplingParams


class Executor:
    fail_at: int | None = None

    def __init__(self, cfg, max_len):
        self.w, self.n = NullWorker(cfg), 0

    def determine_num_blocks(self):
        return 256

    def initialize_cache(self, n):
        pass

    def execute_async(self, step):
        return step

    def wait(self, step):
        self.n += 1
        if self.fail_at is not None and self.n >= self.fail_at:
            raise RuntimeError("CUDA error: out of memory")
        return self.w.execute(step)

    def shutdown(self):
        pass


@pytest.fixture
def loop(llama_dir):
    eng = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=256, device="cpu"), executor_factory=Executor)
    sent = []
    lp = SchedulerLoop(eng, 0, lambda ingress, batch: sent.append((ingress, batch)), max_waiting=100)
    lp.register_ingress("ing", "epoch-1")
    return lp, sent


def submit(lp, rid, tenant, n_tokens=20, max_tokens=8, bill=True):
    req = SubmitRequest(rid, list(range(1, n_tokens + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                        "ing", tenant=tenant, model="tiny", bill_prompt=bill)
    assert lp.submit(req).ok


def finishes(sent):
    return {u.request_id: u.finish_reason for _, b in sent for u in b.updates if u.finish_reason}


def test_every_ending_is_metered_once(loop):
    lp, sent = loop
    submit(lp, "a", "t1")
    submit(lp, "b", "t2", max_tokens=100)
    submit(lp, "c", "t1", bill=False)  # second child of an n=2 request
    while len(finishes(sent)) < 2:
        lp.run_once()
    lp.abort(["b"], "client_disconnected")
    lp.run_once()
    events = {e.request_id: e for e in lp.usage.outbox}
    assert set(events) == {"a", "b", "c"}
    assert events["a"].status == "length" and events["a"].completion_tokens == 8
    assert events["b"].status == "client_disconnected" and 0 < events["b"].completion_tokens < 100
    assert events["c"].prompt_tokens == 0 and events["c"].completion_tokens == 8
    assert lp.usage.tenant_totals["t1"] == {"requests": 2, "prompt_tokens": 20, "cached_tokens": 0, "completion_tokens": 16}
    # Batches to the ingress are numbered from 0 without gaps.
    assert [b.seq for _, b in sent] == list(range(len(sent))) and all(b.epoch == "epoch-1" for _, b in sent)
    lp.usage.ack(2)
    assert [e.request_id for e in lp.usage.take()] == [list(events)[2]]


def test_worker_failure_answers_and_meters_every_live_request(loop):
    lp, sent = loop
    submit(lp, "a", "t1", max_tokens=50)
    submit(lp, "b", "t2", max_tokens=50)
    lp.run_once()
    lp.engine.executor.fail_at = lp.engine.executor.n + 1
    submit(lp, "c", "t2")  # still in the inbox when the step fails
    with pytest.raises(StepFailed) as e:
        lp.run_once()
    lp.fail_all("error", e.value.requests)
    assert finishes(sent) == {"a": "error", "b": "error", "c": "error"}
    assert sorted((ev.request_id, ev.status) for ev in lp.usage.outbox) == [("a", "error"), ("b", "error"), ("c", "error")]
    assert lp.engine.kv.num_free_blocks == 256 and not lp.engine.has_unfinished()


def test_restarted_ingress_gets_fresh_numbering_and_orphans_are_aborted(loop):
    lp, sent = loop
    submit(lp, "a", "t1", max_tokens=200)
    for _ in range(3):
        lp.run_once()
    lp.register_ingress("ing", "epoch-2")  # the ingress died and came back
    lp.run_once()
    # A failure on our side: metered "error" with what was generated, unless the restarted
    # ingress's record of what the client received supersedes it (delivery_journal.py).
    assert [ev.status for ev in lp.usage.outbox] == ["error"]
    submit(lp, "b", "t1", max_tokens=3)
    while "b" not in finishes(sent):
        lp.run_once()
    new = [b for _, b in sent if b.epoch == "epoch-2"]
    assert [b.seq for b in new] == list(range(len(new)))


def test_engine_client_batches_a_turns_submissions_and_fails_them_together(llama_dir):
    """Submissions made in one event-loop turn reach a replica as one
    submit_batch call; when that call cannot even be sent, every caller gets
    the error (none waits forever)."""
    import asyncio
    import concurrent.futures

    from ziggurat.actors.ingress.ray_client import RayEngineClient
    from ziggurat.actors.scheduler.output_processor import RequestOutputs
    from ziggurat.models.tokenizer import Tokenizer

    tok = Tokenizer(llama_dir)

    def one(rid):  # a one-prompt, one-sample request
        return RequestOutputs(rid, [[1, 2]], SamplingParams(), tok)

    class Ref:
        def __init__(self, v):
            self.v = v

        def future(self):
            f = concurrent.futures.Future()
            f.set_result(self.v)
            return f

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *a):
            return self.fn(*a)

    calls = []

    class Router:
        route = Method(lambda hashes, n, adapter=None: Ref(0))
        mark_unhealthy = Method(lambda r: Ref(None))

    class Scheduler:
        fail = False

        def _batch(reqs):
            calls.append([r.request_id for r in reqs])
            if Scheduler.fail:
                raise TypeError("cannot serialize argument")
            return Ref([SubmitResult(True) for _ in reqs])

        submit_batch = Method(_batch)
        abort = Method(lambda ids, reason: None)

    meta = dict(tenant="t", key_id="k", http_request_id="h", model="m")

    async def main():
        c = RayEngineClient("ing", Router(), ["scheduler-0"])
        c.schedulers = [Scheduler()]
        c.bind(asyncio.get_running_loop())
        q = asyncio.Queue()
        got = await asyncio.gather(*[c.submit(one(f"r{i}"), [], (), q, meta) for i in range(3)])
        assert got == [0, 0, 0] and calls == [["r0-0", "r1-0", "r2-0"]]  # one call for the turn
        Scheduler.fail = True
        res = await asyncio.wait_for(asyncio.gather(
            *[c.submit(one(f"s{i}"), [], (), q, meta) for i in range(2)], return_exceptions=True), 5)
        assert all(isinstance(e, TypeError) for e in res), res

    asyncio.run(main())


def test_null_worker_simulates_a_device_step(llama_dir):
    """With null_step_us the double behaves like a GPU to its caller: launching
    returns at once, steps run back to back, wait returns at the step's end;
    an empty (flush) step occupies nothing."""
    import time

    import numpy as np

    from ziggurat.models.step import NewRequestData, StepInput

    w = NullWorker(EngineConfig(model=str(llama_dir), device="cpu", extra={"null_step_us": 20_000}))
    first = StepInput([NewRequestData("a", 0, [1, 2, 3], [], SamplingParams(), [0], 0)],
                      rows=np.array([0], np.int32), num_tokens=np.array([3], np.int32))
    t0 = time.perf_counter()
    h1 = w.execute_async(first)
    h2 = w.execute_async(StepInput(rows=np.array([0], np.int32), num_tokens=np.array([1], np.int32)))
    h3 = w.execute_async(StepInput())
    assert time.perf_counter() - t0 < 0.015  # launches do not wait
    out1 = w.wait(h1)
    assert 0.019 <= time.perf_counter() - t0
    out2 = w.wait(h2)
    assert 0.039 <= time.perf_counter() - t0  # the second ran after the first
    assert out1.rows.tolist() == [0] and out2.rows.tolist() == [0] and len(w.wait(h3)) == 0


def test_a_restarted_ingress_cannot_wedge_on_a_lost_first_batch(llama_dir):
    """Issue 12's wedge: a new ingress incarnation whose first TokenBatch is lost
    waited for it forever. Now batches that come before the event loop is bound
    are kept, registration says where numbering starts, and a gap that outlives
    gap_timeout_s is skipped."""
    import asyncio

    from ziggurat.actors.ingress.engine_client import EngineClient
    from ziggurat.actors.scheduler.messages import Registration, RequestUpdate, StepUpdates, TokenBatch

    def batch(seq, rid, token, source="run-2", epoch="e2"):
        u = StepUpdates()
        u.append(RequestUpdate(rid, [token], [], None, None, 3, 0, seq + 1))
        return TokenBatch(0, epoch, seq, u, source)

    async def main():
        c = EngineClient("ing", epoch="e2")
        c.attached(Registration(replica=0, incarnation="run-2", next_seq=0))
        q = asyncio.Queue()
        c.queues["r"] = (q, 0)
        c.push_tokens([batch(0, "r", 10)])  # before the loop is bound: kept, not lost
        c.bind(asyncio.get_running_loop())
        await asyncio.sleep(0)
        assert (await asyncio.wait_for(q.get(), 1))[1].new_token_ids == [10]
        # seq 1 is lost; 2 and 3 arrive and wait...
        c.push_tokens([batch(2, "r", 12), batch(3, "r", 13)])
        c.push_tokens([batch(4, "r", 99, source="run-1")])  # a batch of the replica's dead run: dropped
        await asyncio.sleep(0)
        assert q.empty()
        c.check_gaps(now=time.monotonic() + 0.5)
        assert q.empty()  # not yet
        c.check_gaps(now=time.monotonic() + c.gap_timeout_s + 1)  # ...until the gap outlives the timeout
        got = [(await asyncio.wait_for(q.get(), 1))[1].new_token_ids for _ in range(2)]
        assert got == [[12], [13]] and c.gaps_skipped == 1 and q.empty()

    asyncio.run(main())
