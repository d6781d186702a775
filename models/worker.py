"""Worker: one TP rank end to end — join the group, load the shard, size and
own the KV cache, execute steps. The Ray worker actor and the offline
executors both wrap this class."""

from __future__ import annotations

import logging

import torch

from ziggurat.config import EngineConfig
from ziggurat.kernels.backend import use_triton
from ziggurat.models.config import ModelConfig
from ziggurat.models.kv_transfer import KVSide
from ziggurat.models.lora import LoRALimits
from ziggurat.models.runner import ModelRunner
from ziggurat.models.step import KVEndpoint, KVPull, KVTransferRecord, StepInput, StepOutput
from ziggurat.topology.distributed import init_tensor_parallel

log = logging.getLogger(__name__)


def default_device(config: EngineConfig) -> str:
    if config.device:
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None, max_model_len: int = 0):
        self.config, self.rank = config, rank
        dev = default_device(config)
        if dev.startswith("cuda"):
            self.device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(self.device)
            # The KV budget subtracts this engine's peak; an engine made earlier in
            # this process (and released) must not count.
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.device = torch.device("cpu")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        init_tensor_parallel(rank, config.tensor_parallel_size, init_method or "", backend)
        torch.manual_seed(config.seed)
        self.model_config = ModelConfig.from_dir(config.model, config.dtype, config.quantization, config.kv_cache_dtype)
        self.runner = ModelRunner(self.model_config, self.device, config.block_size, max_model_len, config.seed,
                                  lora=LoRALimits.of(config))
        self.kv: KVSide | None = None  # prefill/decode transfers, once the cache exists

    def determine_num_blocks(self) -> int:
        c = self.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        block_bytes = self.runner.kv_block_bytes()
        if self.device.type != "cuda":
            return max(1, c.kv_cache_bytes // block_bytes)
        self.runner.profile_run(min(c.max_num_batched_tokens, self.runner.model.rotary.cos_sin_cache.shape[0]))
        return max(0, self.runner.available_kv_bytes(c.gpu_memory_utilization) // block_bytes)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        c = self.config
        if self.device.type == "cuda":
            self.runner.warmup()
        # Graphs run the Triton kernels (the torch reference path syncs with the host).
        if self.device.type == "cuda" and not c.enforce_eager and use_triton(torch.empty(0, device=self.device)):
            secs = self.runner.capture_decode_graphs(min(c.max_num_seqs, c.cuda_graph_max_batch))
            if self.rank == 0:
                log.info("captured %d decode CUDA graphs in %.1f s", len(self.runner.graphs.buckets), secs)

    # -- KV transfer between replicas (models/kv_transfer.py) ---------------------------

    def _kv_side(self) -> KVSide:
        if self.kv is None:
            c = self.config
            self.kv = KVSide(self.runner.model, self.device, self.rank, c.tensor_parallel_size,
                             self.model_config.num_kv_heads, c.kv_transfer_timeout_s)
        return self.kv

    def kv_endpoint(self, handle=None) -> KVEndpoint:
        """This rank as a source of KV blocks (handle: how a peer reaches it to pair)."""
        return self._kv_side().endpoint(handle)

    def kv_warmup(self) -> None:
        self._kv_side().warmup()

    def kv_serve(self, pair_id: str, backend: str) -> None:
        self._kv_side().serve(pair_id, backend)

    def kv_pull(self, pulls: list[KVPull]) -> list[KVTransferRecord]:
        delay = self.config.extra.get("kv_pull_delay_s")  # a drill: hold pulls open (tests kill a side mid-transfer)
        if delay:
            import time

            time.sleep(float(delay))
        return self._kv_side().pull(pulls)

    def execute(self, step: StepInput) -> StepOutput | None:
        return self.runner.execute(step)

    def execute_async(self, step: StepInput):
        """Launch a step; pass the handle to wait(). A second step may be
        launched before the first is waited for."""
        if step.inject_fault:  # a failure drill: every rank fails this step, before any collective
            raise RuntimeError(f"injected fault in the forward pass (rank {self.rank}, step {step.step_id})")
        return self.runner.execute_async(step)

    def sample_deferred(self, handle, masks) -> None:
        """Sample a step launched with deferred sampling, under its grammar masks (GrammarMasks)."""
        self.runner.sample_deferred(handle, masks)

    def wait(self, handle) -> StepOutput | None:
        return self.runner.wait(handle)
