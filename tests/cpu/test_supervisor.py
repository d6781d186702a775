"""The supervisor's verdict on a replica's health answer (plain Python)."""

from __future__ import annotations

import asyncio

from ziggurat.actors.scheduler.messages import ReplicaHealth
from ziggurat.cluster.supervisor import judge


def h(failed=False, busy=False, since=0.0):
    return ReplicaHealth(0, "run", failed, busy, since)


def test_judge():
    assert judge(h(), step_deadline_s=60) is None
    assert judge(h(busy=True, since=59), step_deadline_s=60) is None
    assert "no step ended for 61 s" == judge(h(busy=True, since=61), step_deadline_s=60)
    assert judge(h(since=600), step_deadline_s=60) is None  # idle: nothing to be stuck on
    assert judge(h(failed=True), step_deadline_s=60) == "a step failed"
    assert judge(asyncio.TimeoutError(), step_deadline_s=60) == "no answer (TimeoutError)"
