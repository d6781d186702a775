"""EngineConfig: every knob of one replica's engine, each defined once.

Validated here; `ziggurat serve` and `ziggurat generate` make one flag per
field (from the help below), the deployment spec nests it
(cluster/spec.py), and `LLM(model, **fields)` takes the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


QUANTIZATION_METHODS = ("fp8",)  # models/quantization.py
KV_CACHE_DTYPES = ("auto", "fp8")


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class EngineConfig:
    model: str = field(metadata={"help": "HF-format model directory, or a GGUF file"})
    dtype: str | None = _opt(None, "weights and activations: float32, float16, bfloat16 (default: the checkpoint's)")
    # FP8 (models/quantization.py): checkpoints already in FP8 (compressed-tensors, vLLM fp8) load as such;
    # this quantizes a 16-bit one at load.
    quantization: str | None = _opt(None, "fp8: quantize the linear layers to FP8 at load (per-channel weight "
                                          "scales, per-token activation scales)")
    kv_cache_dtype: str = _opt("auto", "auto (the model's dtype) or fp8 (e4m3, a scale per layer: 1.0 or the "
                                       "checkpoint's k_scale/v_scale)")
    tensor_parallel_size: int = _opt(1, "GPUs (ranks) per replica", short="-tp")
    device: str | None = _opt(None, "cuda or cpu (default: cuda if available)")
    block_size: int = _opt(16, "tokens per KV-cache block (a power of two)")
    # KV cache size. GPU: sized from free memory (gpu_memory_utilization) unless
    # num_kv_blocks is given. CPU: num_kv_blocks, else kv_cache_bytes.
    num_kv_blocks: int | None = _opt(None, "KV-cache blocks per replica (default: sized from memory)")
    kv_cache_bytes: int = _opt(1 << 30, "KV-cache bytes on a CPU, when num_kv_blocks is not given")
    gpu_memory_utilization: float = _opt(0.9, "fraction of GPU memory for weights, activations and KV cache")
    max_model_len: int | None = _opt(None, "context length (default: the model's max_position_embeddings)")
    max_num_seqs: int = _opt(256, "requests in the running batch at most")
    max_num_batched_tokens: int = _opt(8192, "the per-step token budget (chunked prefill)")
    # How a step's budget is spent (actors/scheduler/scheduler.py): "fcfs" spends the whole
    # budget in admission order; "decode_first" runs every decode, then at most
    # max_prefill_tokens prompt tokens while anything decodes (so a long prompt cannot stretch
    # the step its decodes wait on). fcfs stays the default: on nvidia-h200 decode_first cut
    # ITL p99 by 25-60% but cost 16-28% of saturation throughput (BENCHMARKS.md).
    schedule_policy: str = _opt("fcfs", "fcfs or decode_first: how each step's token budget is spent")
    max_prefill_tokens: int = _opt(2048, "decode_first: prompt tokens per step at most while requests decode")
    # decode_first by time: the prompt share is sized from the engine's own step timings so a step
    # lasts about target_step_ms (actors/scheduler/step_cost.py); max_prefill_tokens until the fit is ready.
    target_step_ms: float | None = _opt(None, "decode_first: size each step's prompt share so the step takes "
                                              "about this many ms (fitted from measured steps)")
    enable_prefix_caching: bool = _opt(True, "reuse the KV of cached prompt prefixes")
    # Schedule step N+1 while step N runs (its sampled tokens count as pending).
    async_scheduling: bool = _opt(True, "schedule the next step while the current one runs")
    # CUDA graphs for decode steps of up to cuda_graph_max_batch sequences
    # (captured at start-up); enforce_eager turns them off.
    enforce_eager: bool = _opt(False, "no CUDA graphs")
    cuda_graph_max_batch: int = _opt(256, "largest decode batch captured as a CUDA graph")
    seed: int = _opt(0, "the engine's base seed for unseeded sampling")
    otlp_traces_endpoint: str | None = _opt(None, "request traces (OpenTelemetry): console, file:///path or an "
                                                  "OTLP/HTTP collector URL (default: off)")
    kv_transfer_timeout_s: float = _opt(30.0, "prefill/decode: a KV hand-off not completed within this is abandoned "
                                                    "and its blocks freed on both sides")
    # LoRA (models/lora.py): adapters applied per request, max_loras of them in one batch
    # (weights in fixed GPU slots of max_lora_rank), max_cpu_loras kept in host memory.
    enable_lora: bool = _opt(False, "serve LoRA adapters (their GPU slots are allocated at start-up)")
    max_loras: int = _opt(4, "LoRA: distinct adapters in one batch at most (GPU slots per replica)")
    max_lora_rank: int = _opt(16, "LoRA: the largest adapter rank served")
    max_cpu_loras: int | None = _opt(None, "LoRA: adapters kept in host memory per replica, least recently used "
                                           "evicted (default: max_loras)")
    extra: dict = field(default_factory=dict, metadata={"help": "worker-specific settings", "cli": False})

    def __post_init__(self) -> None:
        p = Path(self.model)
        if not p.exists():
            raise ConfigError(f"model: {self.model!r} does not exist")
        if not (p.is_dir() or p.suffix == ".gguf"):
            raise ConfigError(f"model: {self.model!r} is neither a model directory nor a .gguf file")
        for name in ("tensor_parallel_size", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "cuda_graph_max_batch", "max_prefill_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.schedule_policy not in ("decode_first", "fcfs"):
            raise ConfigError(f"schedule_policy: must be decode_first or fcfs, got {self.schedule_policy!r}")
        if self.target_step_ms is not None:
            if isinstance(self.target_step_ms, bool) or not isinstance(self.target_step_ms, (int, float)) \
                    or not 0 < self.target_step_ms < 60_000:
                raise ConfigError(f"target_step_ms: must be a number of milliseconds in (0, 60000), got "
                                  f"{self.target_step_ms!r}")
            if self.schedule_policy != "decode_first":
                raise ConfigError("target_step_ms: only the decode_first schedule_policy sizes steps by time "
                                  f"(schedule_policy is {self.schedule_policy!r})")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"quantization: must be one of {list(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype: must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size: must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks: must be positive, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len: must be at least 2, got {self.max_model_len}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"device: must be cuda or cpu, got {self.device!r}")
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
        if self.max_lora_rank > 512:
            raise ConfigError(f"max_lora_rank: at most 512, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and (not isinstance(self.max_cpu_loras, int) or isinstance(
                self.max_cpu_loras, bool) or self.max_cpu_loras < self.max_loras):
            raise ConfigError(f"max_cpu_loras: must be an integer >= max_loras ({self.max_loras}), "
                              f"got {self.max_cpu_loras!r}")
        ep = self.otlp_traces_endpoint
        if ep is not None and not (ep == "console" or ep.startswith(("file://", "http://", "https://"))):
            raise ConfigError(f"otlp_traces_endpoint: must be console, file:///path or an http(s):// URL, got {ep!r}")
