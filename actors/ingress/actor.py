"""IngressActor: the HTTP front door as a Ray actor.

uvicorn (uvloop) serves the OpenAIServer app on its own thread inside the
actor; schedulers' per-step TokenBatches arrive as actor calls (Ray's
threads) and are handed to uvicorn's loop with call_soon_threadsafe. Several
ingress actors can share one port (SO_REUSEPORT). The actor restarts after a
crash, rebinds its port and re-registers with every scheduler under a new
epoch, so batch numbering starts afresh.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import ray

from ziggurat.actors.ingress.delivery_journal import DeliveryJournal
from ziggurat.actors.ingress.gatekeeper import Gatekeeper
from ziggurat.actors.ingress.http_protocol import DeadlineH11Protocol
from ziggurat.actors.ingress.ray_client import RayEngineClient
from ziggurat.actors.process import configure_logging
from ziggurat.actors.tracing import Tracing
from ziggurat.actors.ingress.server import IngressConfig, OpenAIServer
from ziggurat.actors.process import freeze_startup_heap
from ziggurat.actors.scheduler.messages import ReplicaInfo, TokenBatch

__all__ = ["IngressActor", "IngressConfig"]


@ray.remote(num_cpus=0, max_concurrency=16, max_restarts=-1)
class IngressActor:
    """Restartable: a restarted ingress binds the same port, numbers its token
    batches under a fresh epoch, and re-registers with every scheduler."""

    def __init__(self, config: IngressConfig, replica: ReplicaInfo, ingress_id: str, router: str | list[str],
                 schedulers: list[str], meter: str | None = None, journal_dir: str | None = None,
                 traces_endpoint: str | None = None, supervisor: str | None = None,
                 cold_start_timeout_s: float = 0.0):
        """replica: the limits all replicas hold; router, schedulers, meter: actor
        names (looked up here, also after a restart)."""
        import uvicorn

        configure_logging()
        router = [ray.get_actor(n) for n in ([router] if isinstance(router, str) else router)]  # one or several
        meter = ray.get_actor(meter) if meter is not None else None
        self.config = config
        epoch = uuid.uuid4().hex
        me = ray.get_runtime_context().current_actor
        self.client = RayEngineClient(ingress_id, router, schedulers, epoch, me, supervisor, cold_start_timeout_s)
        self.gate = Gatekeeper(meter, config.api_keys, config.share_prefix_cache)
        journal = None
        if journal_dir is not None:  # a predecessor's open streams: bill what their clients received
            path = f"{journal_dir}/{ingress_id}.jsonl"
            recovered = DeliveryJournal.recover(path)
            journal = DeliveryJournal(path)
        self.server = OpenAIServer(config, self.client, self.gate, replica, meter, journal,
                                   Tracing(traces_endpoint, ingress_id))
        if journal_dir is not None and recovered:
            self.server.records.pending.extend(recovered)
        for r in range(len(schedulers)):  # one being rebuilt now is attached when the supervisor says so
            self.client.attach(r)
        app = self.server.asgi

        async def asgi(scope, receive, send):  # start background tasks on uvicorn's loop
            if scope["type"] == "lifespan":
                await receive()
                await self.server.start()  # binds the engine client to this loop
                await send({"type": "lifespan.startup.complete"})
                await receive()
                await send({"type": "lifespan.shutdown.complete"})
                return
            await app(scope, receive, send)

        ucfg = uvicorn.Config(asgi, host=config.host, port=config.port, loop="uvloop", log_level="warning",
                              lifespan="on", timeout_keep_alive=30,
                              http=DeadlineH11Protocol.with_timeout(config.read_timeout_s))
        self.uvicorn = uvicorn.Server(ucfg)
        # SO_REUSEPORT: several ingress actors on one host share the port and
        # the kernel spreads connections across them.
        sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((config.host, config.port))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, name="uvicorn",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.uvicorn.started:
            raise RuntimeError(f"ingress could not listen on {config.host}:{config.port}")
        freeze_startup_heap()

    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def requests_served(self) -> int:
        return self.server.http_requests.get(200, 0)

    def is_open(self) -> bool:
        return self.gate.open

    def replica_failed(self, replica: int) -> None:
        """The supervisor found the replica dead or failed: end our requests on it now."""
        loop = self.client.loop
        if loop is not None:
            loop.call_soon_threadsafe(self.client.replica_failed, replica)

    def replica_rebuilt(self, replica: int) -> bool:
        """The supervisor rebuilt the replica: register with its new scheduler."""
        return self.client.attach(replica)

    def health(self) -> dict:
        """For the supervisor: is the HTTP event loop turning (a callback runs within 2 s)?"""
        loop, turning = self.client.loop, False
        if loop is not None and self.uvicorn.started:
            done = threading.Event()
            loop.call_soon_threadsafe(done.set)
            turning = done.wait(2.0)
        return {"serving": turning, "inflight": len(self.client.queues), "gaps_skipped": self.client.gaps_skipped}

    def push_tokens(self, batches: list[TokenBatch]) -> None:
        """One scheduler's TokenBatches for this ingress, oldest first (one or more steps)."""
        self.client.push_tokens(batches)

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=5)
