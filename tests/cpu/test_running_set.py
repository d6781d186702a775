"""RunningSet (the scheduler's columns) and StepUpdates (a step's updates as columns)."""

from ziggurat.actors.core.request import Request
from ziggurat.actors.core.running import RunningSet
from ziggurat.actors.core.scheduler import RequestUpdate, StepUpdates
from ziggurat.sampling_params import SamplingParams


def _req(i: int, **kw) -> Request:
    r = Request(f"r{i}", list(range(10 + i)), SamplingParams(max_tokens=50 + i, **kw), eos_token_ids=(2,))
    r.num_computed_tokens, r.num_pending = 3 * i, i % 2
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
    assert rs.ids == ["r0", "r2", "r3", "r5"] and rs.pos == {"r0": 0, "r2": 1, "r3": 2, "r5": 3}
    assert list(rs.computed[:4]) == [100, 106, 109, 115] and list(rs.max_out[:4]) == [50, 52, 53, 55]
    assert rs.reqs[rs.pos["r2"]] is reqs[2] and "r1" not in rs.pos and (rs.computed[1], rs.pending[1]) == (106, 0)


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
