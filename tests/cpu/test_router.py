"""The router's policies on hand-made states: the kv-aware cost (hits against load, no
death spiral, no stranding of a short shared prefix), several routers with one view,
LoRA residency, prefill/decode pairs, the A/B policies and the autoscaling signal."""

from __future__ import annotations

import pytest

from ziggurat.actors.router.policy import Router
from ziggurat.actors.router.scoring import RouterConfig
from ziggurat.actors.scheduler.block_pool import prompt_block_hashes
from ziggurat.actors.scheduler.messages import KVEvents, ReplicaStats
from ziggurat.cluster.autoscale import AutoscalingConfig, PoolState, decide

BS = 16


def prompt(seed: int, n: int, prefix: list[int] = ()) -> list[int]:
    return list(prefix) + [(seed * 7919 + i * 31) % 997 + 1 for i in range(n - len(prefix))]


def holds(router: Router, replica: int, tokens: list[int], seq: int = 0, epoch: str = "e") -> None:
    """Replica `replica` reports caching every full block of `tokens`."""
    ev = KVEvents(replica, epoch, seq, prompt_block_hashes(tokens, BS), [], snapshot=seq == 0)
    router.kv_events(ev)


def stats(r: int, waiting=0, running=0, waiting_tokens=0, kv=0.0, adapters=()) -> ReplicaStats:
    return ReplicaStats(r, waiting, running, kv, 100, 100, 0, 0, num_waiting_tokens=waiting_tokens,
                        adapters=list(adapters))


def route(router: Router, tokens: list[int], adapter=None) -> int:
    return router.route(prompt_block_hashes(tokens, BS), len(tokens), adapter).replica


def kv_router(n=4, clock=lambda: 0.0, **cfg) -> Router:
    """A kv-aware router on a clock that stands still unless given one (queues do not drain
    between calls, and replicas' messages never count its picks: they may have left first)."""
    return Router(n, config=RouterConfig(routing_recent_ttl_s=0.0, **cfg), block_size=BS, clock=clock)


def test_a_long_hit_wins_until_the_queue_costs_more_than_it_saves():
    r = kv_router()
    sysp = prompt(1, 608)
    for i in range(4):
        holds(r, i, [] if i != 2 else sysp)
    q = sysp + prompt(2, 40)
    assert route(r, q) == 2 and r.last.matches[2] == 38
    r.report(stats(2, waiting=1, waiting_tokens=400))  # 400 queued tokens < 608 saved
    assert route(r, q) == 2
    r.report(stats(2, waiting=2, waiting_tokens=1400))  # more queued than the hit saves
    r.report(stats(0))
    assert route(r, q) != 2 and r.last.load_override


def test_a_miss_goes_by_load_not_to_the_smallest_tree():
    """SGLang's death spiral: misses pile onto the replica with the least cached. Here a
    miss costs the same everywhere, so load decides (and the emptiest cache is busy)."""
    r = kv_router()
    for i in (0, 1, 3):
        holds(r, i, prompt(10 + i, 640))
    holds(r, 2, [])
    r.report(stats(2, waiting=3, running=4, waiting_tokens=2000))
    picks = [route(r, prompt(100 + k, 300)) for k in range(6)]
    assert 2 not in picks and len(set(picks)) == 3  # spread over the other three by load


def test_a_short_shared_prefix_does_not_strand_every_chat_on_one_replica():
    """Every chat shares a 3-block system prompt held by replica 0 only: chats spread by
    load instead of all following the 48 shared tokens (the issue's 2-2.25x imbalance)."""
    r = kv_router()
    chat_sys = prompt(5, 3 * BS)
    holds(r, 0, chat_sys)
    for i in (1, 2, 3):
        holds(r, i, [])
    picks = [route(r, prompt(200 + c, 120, chat_sys)) for c in range(8)]
    assert max(picks.count(i) for i in range(4)) <= 3 and len(set(picks)) >= 3


def _herd(pending_s: float) -> list[int]:
    """Replica 0 holds a 4-block prefix (a 3 ms saving); each request adds 400 new tokens.
    Between picks, KV events arrive from both replicas that left before the last pick
    reached them (nothing queued): over HTTP, the submit call and the message's trip."""
    now = [0.0]
    r = kv_router(2, clock=lambda: now[0], routing_balance_s=0.0, routing_placement_share=0.0,
                  routing_pending_s=pending_s)
    shared = prompt(30, 4 * BS)
    holds(r, 0, shared)
    holds(r, 1, [])
    picks, seq = [], 1
    for k in range(6):
        picks.append(route(r, prompt(40 + k, 4 * BS + 400, shared)))
        now[0] += 0.005
        for i in (0, 1):
            r.kv_events(KVEvents(i, "e", seq, [], [], num_waiting=0, num_running=0))
        seq += 1
    return picks


def test_a_message_that_left_before_the_picks_reached_the_replica_does_not_erase_them():
    """The herding seen over HTTP: every KV event reset the router's count of its own picks,
    so a replica that had just been sent a request looked idle again on a message that
    left before the request arrived, and took the next one too."""
    assert _herd(pending_s=0.0) == [0] * 6  # the old accounting: every request onto the small saving
    picks = _herd(pending_s=RouterConfig().routing_pending_s)
    assert picks.count(0) == picks.count(1) == 3, picks  # picks still unseen count: spread by load


def test_the_replicas_count_replaces_the_picks_it_can_have_seen():
    now = [0.0]
    r = kv_router(2, clock=lambda: now[0])
    holds(r, 0, [])
    holds(r, 1, [])
    for k in range(3):
        route(r, prompt(60 + k, 600))
        now[0] += 0.01
    # A report arriving now counts the picks made more than routing_pending_s ago, not the rest.
    window = RouterConfig().routing_pending_s
    r.report(stats(0, waiting=1))
    r.report(stats(1, waiting=1))
    assert sum(x.picks_since for x in r.replicas) == 3  # made 10-30 ms ago: the reports may predate them
    assert sum(x.requests for x in r.replicas) == 2 + 3
    now[0] += window
    r.kv_events(KVEvents(0, "e", 1, [], [], num_waiting=2, num_running=0))
    r.kv_events(KVEvents(1, "e", 1, [], [], num_waiting=1, num_running=0))
    assert [x.picks_since for x in r.replicas] == [0, 0] and sum(x.requests for x in r.replicas) == 3


def test_a_new_prefix_settles_on_a_replica_below_its_share_unless_its_queue_costs_more():
    """Where a new prefix lands, its followers go: placed by this instant's queues, homes pile
    onto whichever replica happens to be idle when a miss comes. Placement goes to the
    replicas at or below the even share of recent traffic, unless that costs the request
    more than routing_placement_slack_s of queue."""
    now = [0.0]
    r = kv_router(2, clock=lambda: now[0])
    home = prompt(70, 600)
    holds(r, 0, home)
    holds(r, 1, [])
    for k in range(12):  # replica 0's prefix is popular: its share of recent requests rises
        assert route(r, home + prompt(80 + k, 32)) == 0
        now[0] += 1.0
        r.report(stats(0))
    r.report(stats(0))  # idle right now
    r.report(stats(1, waiting=1, running=1, waiting_tokens=300))  # a short queue (15 ms)
    assert route(r, prompt(90, 640)) == 1 and r.counters["placements_steered"] == 1
    free = kv_router(2, clock=lambda: now[0], routing_placement_share=0.0)
    holds(free, 0, home)
    holds(free, 1, [])
    for k in range(12):
        assert route(free, home + prompt(80 + k, 32)) == 0
        now[0] += 1.0
        free.report(stats(0))
    free.report(stats(1, waiting=1, running=1, waiting_tokens=300))
    assert route(free, prompt(90, 640)) == 0  # by this instant's queue alone
    # A hit is not a placement: it stays on its home however the shares stand.
    assert route(r, home + prompt(91, 32)) == 0
    now[0] += 1.0
    r.report(stats(0))
    r.report(stats(1, waiting=4, running=2, waiting_tokens=3000))  # 150 ms of queue: load wins
    assert route(r, prompt(92, 640)) == 0


def test_placement_settings_are_checked_naming_the_field():
    with pytest.raises(ValueError, match="routing_placement_share"):
        RouterConfig(routing_placement_share=0.5)
    with pytest.raises(ValueError, match="routing_pending_s"):
        RouterConfig(routing_pending_s=-1.0)


def test_routers_fed_the_same_events_agree_and_do_not_count_each_other():
    now = [0.0]
    a, b = kv_router(2, clock=lambda: now[0]), kv_router(2, clock=lambda: now[0])
    p = prompt(3, 320)
    for rt in (a, b):
        holds(rt, 0, p)
        holds(rt, 1, [])
    assert route(a, p + [1] * 20) == route(b, p + [1] * 20) == 0
    # a's picks raise a's view of replica 0's queue only; b still sees it idle.
    for k in range(6):
        route(a, prompt(50 + k, 600))
    assert a.replicas[0].queued + a.replicas[1].queued > 6 * 600 and b.replicas[0].queued == 20  # b: its one pick
    # The replica's own count (on KV events arriving after the picks could reach it)
    # replaces each router's own picks.
    now[0] = RouterConfig().routing_pending_s + 0.001
    for rt in (a, b):
        rt.kv_events(KVEvents(0, "e", 1, [], [], num_waiting=3, num_running=2))
    assert a.replicas[0].requests == b.replicas[0].requests == 5


def test_a_restarted_router_rebuilds_its_index_from_snapshots():
    r = kv_router(2)
    p = prompt(4, 400)
    assert r.kv_events(KVEvents(1, "e", 17, prompt_block_hashes(p, BS), []))  # unknown: asks for a snapshot
    assert not r.kv_events(KVEvents(1, "e", 18, prompt_block_hashes(p, BS), [], snapshot=True))
    assert route(r, p + [9] * 10) == 1 and r.last.matches[1] == 25


def test_lora_resident_replica_preferred_cold_load_counted_residency_spreads_under_load():
    r = kv_router(3)
    for i in range(3):
        holds(r, i, [])
    r.report(stats(1, adapters=["fr"]))
    assert route(r, prompt(1, 100), "fr") == 1 and r.counters["adapter_cold"] == 0
    r.report(stats(1, waiting=6, running=8, waiting_tokens=3000, adapters=["fr"]))  # its home is swamped
    other = route(r, prompt(3, 100), "fr")
    assert other != 1 and r.counters["adapter_cold"] == 1  # loaded cold elsewhere: counted
    assert route(r, prompt(4, 100), "fr") == other  # now resident there too (routed since the report)
    assert "fr" in r.load_signal()[other].adapters


def test_an_adapter_just_sent_stays_resident_through_a_report_that_left_before_it():
    """A cold load the router just caused counts as resident there until a report could have seen
    it (routing_pending_s), as picks do; a later report without the adapter ends it."""
    now = [0.0]
    r = kv_router(2, clock=lambda: now[0])
    for i in range(2):
        holds(r, i, [])
    first = route(r, prompt(1, 100), "de")
    now[0] += 0.01
    r.report(stats(first))  # sent before the request reached the replica: no "de" in it yet
    assert r.replicas[first].resident("de") and "de" in r.load_signal()[first].adapters
    now[0] += RouterConfig().routing_pending_s
    r.report(stats(first))  # this one would have seen it: the replica no longer holds it
    assert not r.replicas[first].resident("de") and "de" not in r.load_signal()[first].adapters


def test_prefill_replica_by_kv_score_decode_by_load():
    r = Router(4, roles=["prefill", "prefill", "decode", "decode"], config=RouterConfig(routing_recent_ttl_s=0.0),
               block_size=BS)
    p = prompt(6, 512)
    holds(r, 0, [])
    holds(r, 1, p)
    r.report(ReplicaStats(2, 3, 4, 0.5, 10, 100, 0, 0, role="decode"))
    got = r.route(prompt_block_hashes(p + [3] * 30, BS), len(p) + 30)
    assert got.replica == 1 and got.decode == 3
    assert r.route(prompt_block_hashes([1] * 20, BS), 20).decode is None  # short: served whole


@pytest.mark.parametrize("policy", ["round-robin", "least-load", "prefix-affinity"])
def test_the_other_policies_for_ab(policy):
    r = Router(3, config=RouterConfig(routing_policy=policy), block_size=BS)
    p = prompt(7, 256)
    picks = [route(r, p) for _ in range(6)]
    if policy == "round-robin":
        assert sorted(picks) == [0, 0, 1, 1, 2, 2]
    elif policy == "least-load":
        assert sorted(picks) == [0, 0, 1, 1, 2, 2]  # each pick loads its replica until a report
    else:
        assert len(set(picks)) == 1  # affinity: what it routed itself


def test_bad_policy_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="routing_policy"):
        RouterConfig(routing_policy="fastest")


def test_the_autoscaling_signal_is_what_the_router_sees_and_drives_the_policy():
    r = kv_router(2)
    r.report(stats(0, waiting=5, running=2, waiting_tokens=900, kv=0.5, adapters=["a"]))
    r.report(stats(1, waiting=6, running=2, kv=0.4))
    route(r, prompt(8, 64))
    loads = r.load_signal()
    assert [x.replica for x in loads] == [0, 1] and loads[0].adapters == ["a"]
    assert loads[0].num_waiting + loads[1].num_waiting == 12  # the report's 11 plus this router's pick
    state = PoolState()
    cfg = AutoscalingConfig(scale_up_queue=4.0, scale_up_delay_s=0.0)
    assert decide(cfg, state, 0.0, loads, 0, 2, 1, 4, False) == ("up", None)


def test_the_supervisor_reads_the_routers_view_and_asks_replicas_only_for_the_rest():
    """autoscale.router_view: what the supervisor's decision round takes from one
    load_signal() call. A burst routed but not yet reported reads as pressure; a
    replica the router has no report of (restarted router, rebuilt replica) is left
    for a direct stats call; scaling down keeps an adapter's only home."""
    from ziggurat.cluster.autoscale import router_view

    r = kv_router(3)
    r.report(stats(0, adapters=["a", "b"]))
    r.report(stats(1, adapters=["a"]))
    for i in range(12):  # a burst: the replicas have not reported it yet
        route(r, prompt(20 + i, 64))
    got, ask = router_view(r.load_signal(), [0, 1, 2])
    assert [x.replica for x in got] == [0, 1] and ask == [2]  # no report of 2 yet
    assert sum(x.num_waiting for x in got) >= 8  # what the replicas' own stats (0 waiting) cannot show
    cfg = AutoscalingConfig(scale_up_queue=2.0, scale_up_delay_s=0.0, scale_down_idle_s=1.0)
    assert decide(cfg, PoolState(), 0.0, got, 0, 2, 1, 3, False) == ("up", None)
    assert decide(cfg, PoolState(), 0.0, [stats(0), stats(1)], 0, 2, 1, 3, False) == ("hold", None)
    r.mark_unhealthy(1)  # scaled down or dead: its old report no longer speaks for it
    assert router_view(r.load_signal(), [0, 1])[1] == [1]
    assert router_view(None, [0, 1]) == ([], [0, 1])  # no router answered: ask them all
    # Idle for long enough: slot 1 goes unless it is the only home of an adapter.
    idle = [stats(0, adapters=["a"]), stats(1, adapters=["b"]), stats(2, adapters=["a"])]
    state = PoolState()
    assert decide(cfg, state, 0.0, idle, 0, 3, 1, 3, False) == ("hold", None)
    assert decide(cfg, state, 2.0, idle, 0, 3, 1, 3, False) == ("down", 2)  # "b" lives only on 1
    plain = [stats(0), stats(1), stats(2)]
    state = PoolState()
    decide(cfg, state, 0.0, plain, 0, 3, 1, 3, False)
    assert decide(cfg, state, 2.0, plain, 0, 3, 1, 3, False) == ("down", 2)
    idle = [stats(0, adapters=["a"]), stats(1), stats(2, adapters=["c"])]
    state = PoolState()
    decide(cfg, state, 0.0, idle, 0, 3, 1, 3, False)
    assert decide(cfg, state, 2.0, idle, 0, 3, 1, 3, False) == ("down", 1)  # 2 is "c"'s only home
