"""DeliveryJournal: what each open stream's client has received, on disk.

An ingress killed mid-stream takes with it the one record of what its
clients received; the schedulers only know what they generated. So each
streaming request is journaled as it goes, one short line per event, to a
file that outlives the process (the page cache keeps a killed process's
writes):

    o <engine request id> <json meta>   the stream opened (tenant, key, model, prompt tokens, ...)
    d <engine request id> <tokens>      this many of its tokens have been handed to the socket
    c <engine request id>               it ended normally (the scheduler meters it)

A `d` line is written as soon as the chunk's send has returned (the ASGI
send wrapper in server.py's ClosingStream: the bytes are in the kernel's
socket buffer, which the kernel still delivers after the process dies), so
the journal never claims a chunk the client cannot get; the only miss is a
kill between that send and its line (a few microseconds of Python).

The restarted ingress (same actor name, same file) reads its predecessor's
journal (`recover`) and records a "replica_failed" usage event for every
stream left open, with the tokens its client received; the schedulers meter
those orphans ("error", or a normal ending reached while nobody streamed it)
with what they generated, which such a record supersedes in the ledger.
The file is rewritten with only the open streams once it grows past
`compact_bytes`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ziggurat.actors.meter.messages import UsageEvent


class DeliveryJournal:
    def __init__(self, path: str | Path, compact_bytes: int = 4 << 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.compact_bytes = compact_bytes
        self.open_meta: dict[str, str] = {}  # engine request id -> its "o" line's json
        self.delivered: dict[str, int] = {}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _write(self, line: str) -> None:
        os.write(self._fd, line.encode())

    def opened(self, rid: str, meta: dict) -> None:
        m = json.dumps(meta, separators=(",", ":"))
        self.open_meta[rid] = m
        self.delivered[rid] = 0
        self._write(f"o {rid} {m}\n")

    def sent(self, rid: str, tokens: int) -> None:
        if self.delivered.get(rid, -1) != tokens and rid in self.open_meta:
            self.delivered[rid] = tokens
            self._write(f"d {rid} {tokens}\n")

    def closed(self, rid: str) -> None:
        if self.open_meta.pop(rid, None) is not None:
            self.delivered.pop(rid, None)
            self._write(f"c {rid}\n")
            if not self.open_meta:
                os.ftruncate(self._fd, 0)
            elif os.fstat(self._fd).st_size > self.compact_bytes:
                self._compact()

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for rid, m in self.open_meta.items():
                f.write(f"o {rid} {m}\nd {rid} {self.delivered.get(rid, 0)}\n")
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @staticmethod
    def recover(path: str | Path) -> list[UsageEvent]:
        """Usage events for the streams a predecessor left open (then the file is emptied)."""
        path = Path(path)
        if not path.is_file():
            return []
        opened: dict[str, dict] = {}
        sent: dict[str, int] = {}
        for line in path.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            rid, _, arg = rest.partition(" ")
            try:
                if kind == "o":
                    opened[rid] = json.loads(arg)
                    sent[rid] = 0
                elif kind == "d" and rid in opened:
                    sent[rid] = int(arg)
                elif kind == "c":
                    opened.pop(rid, None)
            except ValueError:  # a line cut short by the kill
                continue
        now = time.time()
        events = []
        for rid, m in opened.items():
            got = sent.get(rid, 0)
            prompt = m["prompt_tokens"] if got and m.get("bill_prompt", True) else 0
            events.append(UsageEvent(
                request_id=rid, http_request_id=m.get("http_request_id"), tenant=m["tenant"], key_id=m.get("key_id"),
                model=m["model"], lora=m.get("lora"), replica=m.get("replica"), gpu_type=None, prompt_tokens=prompt,
                cached_tokens=0, completion_tokens=got, status="replica_failed", arrived_at=m.get("arrived", now),
                finished_at=now, ttft_ms=None, duration_ms=(now - m.get("arrived", now)) * 1e3))
        path.write_text("")
        return events
