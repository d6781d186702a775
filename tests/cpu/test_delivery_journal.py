"""The ingress's delivery journal: a successor bills what the dead ingress's clients received."""

from __future__ import annotations

from ziggurat.actors.ingress.delivery_journal import DeliveryJournal
from ziggurat.actors.meter.ledger import Ledger
from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.meter.store import Store


def meta(**kw):
    return dict(dict(tenant="t1", key_id="k", model="m", http_request_id="h1", prompt_tokens=7, bill_prompt=True,
                     replica=0, arrived=1.0), **kw)


def test_open_streams_are_recovered_with_what_was_sent(tmp_path):
    path = tmp_path / "ingress-0.jsonl"
    j = DeliveryJournal(path)
    j.opened("h1-0", meta())
    j.opened("h1-1", meta(bill_prompt=False))
    j.opened("h2-0", meta(http_request_id="h2"))
    for n in (1, 2, 3):
        j.sent("h1-0", n)
    j.sent("h1-1", 2)
    j.closed("h2-0")  # ended normally: the scheduler meters it
    with open(path, "a") as f:
        f.write("d h1-0 9")  # a line cut short by the kill: no newline, but parseable... the last one counts
    events = {e.request_id: e for e in DeliveryJournal.recover(path)}
    assert set(events) == {"h1-0", "h1-1"}
    a, b = events["h1-0"], events["h1-1"]
    assert (a.status, a.completion_tokens, a.prompt_tokens, a.http_request_id) == ("replica_failed", 9, 7, "h1")
    assert (b.completion_tokens, b.prompt_tokens) == (2, 0)  # the second sample does not bill the prompt
    assert path.read_text() == "" and DeliveryJournal.recover(path) == []


def test_a_stream_that_received_nothing_bills_nothing_and_the_file_stays_small(tmp_path):
    path = tmp_path / "j.jsonl"
    j = DeliveryJournal(path, compact_bytes=2_000)
    j.opened("keep", meta())
    for i in range(200):  # streams come and go while one stays open: compaction keeps the file small
        j.opened(f"r{i}", meta())
        j.sent(f"r{i}", 5)
        j.closed(f"r{i}")
    j.sent("keep", 3)
    assert path.stat().st_size < 4_000
    (e,) = DeliveryJournal.recover(path)
    assert e.request_id == "keep" and e.completion_tokens == 3
    j2 = DeliveryJournal(tmp_path / "k.jsonl")
    j2.opened("x", meta())
    (e,) = DeliveryJournal.recover(tmp_path / "k.jsonl")
    assert e.completion_tokens == 0 and e.prompt_tokens == 0


def test_the_record_supersedes_the_schedulers_error_event_in_either_order(tmp_path):
    ledger = Ledger(Store.open(tmp_path / "l.db"))

    def ev(rid, status, c):
        return UsageEvent(rid, "h", "t", None, "m", None, 0, "cpu", 7, 0, c, status, 0.0, 1.0, None, 1.0)

    ledger.record([ev("a", "error", 40)])  # the scheduler's, with everything it generated
    ledger.record([ev("a", "replica_failed", 12), ev("b", "replica_failed", 5)])
    ledger.record([ev("b", "error", 30)])  # arrives after the record: ignored
    ledger.record([ev("c", "length", 32)])  # finished while its ingress was dead
    ledger.record([ev("c", "replica_failed", 9)])  # what the client got
    ledger.record([ev("d", "stop", 8)])
    got = {e.request_id: (e.status, e.completion_tokens) for e in ledger.events()}
    assert got == {"a": ("replica_failed", 12), "b": ("replica_failed", 5), "c": ("replica_failed", 9),
                   "d": ("stop", 8)}
