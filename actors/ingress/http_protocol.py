"""uvicorn's h11 protocol with a deadline on request heads.

uvicorn closes idle keep-alive connections, but a client that sends a
request head slowly (slowloris) is waited for forever, and enough of them
exhaust the ingress. Here a connection must deliver each request head within
`head_timeout_s` of its first byte (or, for a new connection, of its
opening); otherwise it is closed. Bodies are bounded by the server's own
read timeout (server.py).
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    head_timeout_s = 15.0

    @classmethod
    def with_timeout(cls, seconds: float) -> type:
        return type(cls.__name__, (cls,), {"head_timeout_s": float(seconds)})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._idle():
            self._arm()  # bytes of a new request head: it must be complete in time
        super().data_received(data)
        if not self._idle():
            self._disarm()  # the head arrived; the request is the app's now

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
