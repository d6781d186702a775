"""Executors drive a replica's workers from the scheduler's process.

InProcessExecutor runs the single TP rank in this process. MultiprocExecutor
starts one process per TP rank (gloo on CPU, NCCL on GPU) and fans each step
out over pipes; rank 0 answers with the sampled tokens. (The scheduler actor
drives Workers through compiled graphs instead: compiled_graph.py; same Worker class.)
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback

from ziggurat.config import EngineConfig
from ziggurat.actors.process import freeze_startup_heap
from ziggurat.models.step import StepInput, StepOutput


class InProcessExecutor:
    # The worker launches a step without waiting for it, so the engine schedules
    # and launches the next one while the GPU runs this one.
    overlaps = True
    # A step may be launched before its grammar masks are known (StepInput.defers_sampling):
    # sample_async() masks and samples it once they are.
    defers_sampling = True

    def __init__(self, config: EngineConfig, max_model_len: int):
        from ziggurat.models.worker import Worker

        self.worker = Worker(config, 0, None, max_model_len)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_async(self, step: StepInput):
        return self.worker.execute_async(step)

    def sample_async(self, handle, masks) -> None:
        self.worker.sample_deferred(handle, masks)

    def wait(self, handle) -> StepOutput:
        return self.worker.wait(handle)

    # Prefill/decode (models/kv_transfer.py): in one process, pulls run at once.
    def kv_endpoints(self) -> list:
        return [self.worker.kv_endpoint()]

    def kv_warmup(self) -> None:
        self.worker.kv_warmup()

    def kv_pull(self, pulls) -> list:
        return [self.worker.kv_pull(pulls)]

    def kv_poll(self, handle) -> list:
        return handle

    def shutdown(self) -> None:
        # Drop the model and KV cache so their memory is released (the GPU's
        # too, once the caching allocator is emptied).
        import torch

        import gc

        self.worker = None
        gc.collect()  # CUDA graphs and the model hold reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config: EngineConfig, rank: int, init_method: str, max_model_len: int, conn) -> None:
    try:
        from ziggurat.models.worker import Worker

        worker = Worker(config, rank, init_method, max_model_len)
        conn.send(("ok", None))
        while True:
            method, arg = conn.recv()
            if method == "shutdown":
                break
            result = getattr(worker, method)(arg) if arg is not None else getattr(worker, method)()
            if method == "initialize_cache":
                freeze_startup_heap()  # this process is the worker's own: its start-up heap lives as long
            if rank == 0 or method != "execute":
                conn.send(("ok", result))
    except (EOFError, KeyboardInterrupt):
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass


class WorkerError(RuntimeError):
    pass


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, max_model_len: int):
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.conns, self.procs = [], []
        for rank in range(config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(config, rank, init_method, max_model_len, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            self._recv(c)
        self._sent = self._read = 0  # step calls made / replies read

    def _recv(self, conn):
        try:
            status, payload = conn.recv()
        except EOFError:
            raise WorkerError("a worker process died") from None
        if status == "error":
            raise WorkerError(f"worker failed:\n{payload}")
        return payload

    def _call_all(self, method: str, arg=None) -> list:
        for c in self.conns:
            c.send((method, arg))
        return [self._recv(c) for c in self.conns]

    def kv_endpoints(self) -> list:
        raise NotImplementedError("prefill/decode pools run on the Ray deployment (or tensor_parallel_size 1 in-process)")

    kv_pull = kv_endpoints

    def determine_num_blocks(self) -> int:
        return min(self._call_all("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self._call_all("initialize_cache", num_blocks)

    def execute_async(self, step: StepInput) -> int:
        # Workers run steps in the order sent; rank 0 answers each in order, so
        # the k-th reply belongs to call k.
        for c in self.conns:
            c.send(("execute", step))
        self._sent += 1
        return self._sent - 1

    def wait(self, handle: int) -> StepOutput:
        """Call `handle`'s output. Replies to earlier calls nobody waited for
        (the engine dropped them after a failure) are read and discarded."""
        if handle < self._read:
            raise WorkerError(f"the reply to step call {handle} was already consumed")
        while True:
            out = self._recv(self.conns[0])
            self._read += 1
            if self._read - 1 == handle:
                return out

    def shutdown(self) -> None:
        for c in self.conns:
            try:
                c.send(("shutdown", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.conns, self.procs = [], []


def make_executor(config: EngineConfig, max_model_len: int):
    if config.tensor_parallel_size == 1:
        return InProcessExecutor(config, max_model_len)
    return MultiprocExecutor(config, max_model_len)
