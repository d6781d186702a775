"""RunningSet (the scheduler's columns), worker rows, the step messages'
wire form, and StepUpdates (a step's updates as columns)."""

import pickle

import numpy as np

from ziggurat.actors.scheduler.kv_manager import KVCacheManager
from ziggurat.actors.scheduler.request import Request
from ziggurat.actors.scheduler.running import RunningSet, RowPool
from ziggurat.actors.scheduler.messages import RequestUpdate, StepUpdates
from ziggurat.actors.scheduler.scheduler import Scheduler, SchedulerConfig
from ziggurat.models.step import CachedRequestData, Logprobs, NewRequestData, StepInput, StepOutput
from ziggurat.sampling_params import SamplingParams


def _req(i: int, **kw) -> Request:
    r = Request(f"r{i}", list(range(10 + i)), SamplingParams(max_tokens=50 + i, **kw), eos_token_ids=(2,))
    r.num_computed_tokens, r.num_pending = 3 * i, i % 2
    r.row = 100 + 10 * i  # past the initial row_pos: it grows
    return r


def test_columns_follow_appends_pops_and_removes():
    rs = RunningSet(capacity=2)  # grows on the way
    reqs = [_req(i) for i in range(7)]
    for r in reqs:
        rs.append(r, (16 * (r.num_computed_tokens // 16 + 1), 32), (2,))
    assert len(rs) == 7 and list(rs.computed[:7]) == [3 * i for i in range(7)]
    assert list(rs.max_out[:7]) == [50 + i for i in range(7)] and list(rs.prompt[:7]) == [10 + i for i in range(7)]
    rs.computed[:7] += 100
    last = rs.pop()
    assert last is reqs[6] and last.num_computed_tokens == 118  # written back on the way out
    gone = rs.remove([4, 1, 1])
    assert gone == [reqs[1], reqs[4]] and reqs[4].num_computed_tokens == 112
    assert [r.request_id for r in rs.reqs] == ["r0", "r2", "r3", "r5"]
    assert [rs.index(reqs[i]) for i in (0, 2, 3, 5)] == [0, 1, 2, 3]
    assert list(rs.computed[:4]) == [100, 106, 109, 115] and list(rs.max_out[:4]) == [50, 52, 53, 55]
    assert rs.reqs[rs.index(reqs[2])] is reqs[2] and rs.row_pos[reqs[1].row] == -1
    assert (rs.computed[1], rs.pending[1]) == (106, 0)
    # row -> position follows every move; the rows of the removed map to -1
    assert [int(rs.row_pos[100 + 10 * i]) for i in range(7)] == [0, -1, 1, 2, -1, 3, -1]


def test_stop_ids_and_foreign_eos_take_the_python_stop_check():
    rs = RunningSet()
    plain, stops, foreign, ignoring = _req(0), _req(1, stop_token_ids=[7]), _req(2), _req(3, ignore_eos=True)
    foreign.eos_token_ids = (5,)
    foreign_ignored = _req(4, ignore_eos=True)
    foreign_ignored.eos_token_ids = (5,)
    for r in (plain, stops, foreign, ignoring, foreign_ignored):
        rs.append(r, (0, 0), (2,))
    assert list(rs.py_stop[:5]) == [False, True, True, False, False]


def test_step_updates_round_trip():
    us = [RequestUpdate("a", [5], [], None, None, 10, 4, 1), RequestUpdate("b", [], [], "error", None, 7, 0, 0),
          RequestUpdate("c", [9], [], "stop", 9, 3, 0, 12)]
    s = StepUpdates()
    for u in us:
        s.append(u)
    assert list(s) == us and len(s) == 3
    assert list(s.take([2, 0])) == [us[2], us[0]]
    assert s.take([0]).finished == {} and s.take([1]).finished == {"b": ("error", None)}


def test_row_pool_reuses_a_row_only_after_the_steps_that_may_carry_it():
    pool = RowPool()
    a, b = pool.take(), pool.take()
    assert (a, b) == (0, 1)
    pool.scheduled = 5  # steps 0-4 scheduled; 0-2 applied
    pool.done = 3
    pool.release(a)  # steps 3 and 4 may still carry a token for row a
    assert pool.take() == 2  # a fresh row, not a
    pool.done = 4
    assert pool.take() == 3
    pool.done = 5
    assert pool.take() == a and pool.num_issued == 4


def _scheduler(**kw) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    return Scheduler(cfg, KVCacheManager(64, 16), default_eos_token_ids=(2,))


def test_a_late_token_for_an_aborted_request_never_reaches_the_rows_next_owner():
    """Async scheduling: step B is planned while step A runs. r0 is aborted
    between them and r1 admitted; r1 must not get r0's row while A's output
    (which holds a token for r0's row) is still to be applied."""
    s = _scheduler()
    s.add_request(Request("r0", [5] * 20, SamplingParams(max_tokens=10, ignore_eos=True)))
    step_a = s.schedule()
    (slot0,) = step_a.rows.tolist()
    s.finish_requests(["r0"])
    s.add_request(Request("r1", [6] * 20, SamplingParams(max_tokens=10, ignore_eos=True)))
    step_b = s.schedule()
    assert step_b.finished_rows == [slot0]
    (slot1,) = step_b.rows.tolist()
    assert slot1 != slot0
    ups = s.update_from_output(step_a, StepOutput(np.array([slot0], np.int32), np.array([77], np.int32)))
    assert len(ups) == 0  # dropped: nobody holds slot0
    ups = s.update_from_output(step_b, StepOutput(np.array([slot1], np.int32), np.array([9], np.int32)))
    assert ups.request_ids == ["r1"] and ups.token_ids == [9]
    # Every step that could carry slot0 is applied: the next admission takes it.
    s.add_request(Request("r2", [7] * 20, SamplingParams(max_tokens=10, ignore_eos=True)))
    step_c = s.schedule()
    assert s.requests["r2"].row == slot0 and slot0 in step_c.rows.tolist()


def test_step_messages_pickle_as_a_few_byte_strings():
    sp = SamplingParams(max_tokens=3)
    step = StepInput([NewRequestData("a", 3, [1, 2], [], sp, [4], 0)], [CachedRequestData(1, [9], 32)],
                     np.arange(256, dtype=np.int32), np.ones(256, dtype=np.int32), [5, 6], step_id=12)
    back = pickle.loads(pickle.dumps(step))
    assert back.new_requests == step.new_requests and back.cached_requests == step.cached_requests
    assert back.rows.tolist() == list(range(256)) and back.total_tokens == 256
    assert (back.finished_rows, back.step_id) == ([5, 6], 12)
    assert list(back.scheduled())[:2] == [(0, 1), (1, 1)]
    decode = StepInput(rows=np.arange(256, dtype=np.int32), num_tokens=np.ones(256, dtype=np.int32))
    assert len(pickle.dumps(decode)) < 2 * 256 * 4 + 300  # the arrays' bytes plus a small frame
    out = StepOutput(np.array([3, 1], np.int32), np.array([10, 11], np.int32), [None, Logprobs(11, -0.5, 1, [11], [-0.5])])
    back = pickle.loads(pickle.dumps(out))
    assert back.rows.tolist() == [3, 1] and back.token_ids.tolist() == [10, 11] and back.logprobs == out.logprobs
    assert pickle.loads(pickle.dumps(StepOutput())).logprobs is None and len(StepOutput()) == 0
