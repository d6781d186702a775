"""ModelConfig: what the engine needs from an HF-format directory's config.json.

Parsing is strict: a missing or ill-typed field raises `ModelConfigError`
naming the file and field, so a user with a broken checkpoint learns what is
wrong before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Architectures we run, mapped to the flags that distinguish them. All four
# are the same decoder (pre-norm, RoPE, GQA, SwiGLU); they differ in biases,
# per-head q/k norms and sliding windows.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": dict(qkv_bias=None, qk_norm=False),
    "MistralForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=None, qk_norm=True),
}

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelConfigError(ValueError):
    pass


def parse_dtype(value: str | torch.dtype, where: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ModelConfigError(f"{where}: unsupported dtype {value}")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelConfigError(
            f"{where}: unsupported dtype {value!r}; use one of float32, float16, bfloat16"
        )
    return DTYPES[key]


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default=())
    quantization: object = None  # models/quantization.py::FP8Spec when the linear layers are FP8
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_dir(path: str | Path, dtype: str | torch.dtype | None = None, quantization: str | None = None,
                 kv_cache_dtype: str | None = None) -> "ModelConfig":
        """An HF-format directory's config.json, or a GGUF file's metadata (models/gguf.py).
        quantization / kv_cache_dtype: EngineConfig's (models/quantization.py)."""
        from ziggurat.models import gguf

        path = Path(path)
        try:
            gguf_file = gguf.find_gguf(path)
            raw = gguf.config_dict(gguf_file) if gguf_file else None
        except gguf.GGUFError as e:
            raise ModelConfigError(str(e)) from None
        if gguf_file:
            return ModelConfig.from_dict(raw, path=path, dtype=dtype, where=gguf_file, quantization=quantization,
                                         kv_cache_dtype=kv_cache_dtype)
        if not path.is_dir():
            raise ModelConfigError(f"{path}: model directory does not exist")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelConfigError(f"{cfg_file}: missing (an HF-format model directory needs config.json)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{cfg_file}: expected a JSON object")
        gen = _read_generation_config(path)
        return ModelConfig.from_dict(raw, path=path, dtype=dtype, generation_config=gen, quantization=quantization,
                                     kv_cache_dtype=kv_cache_dtype)

    @staticmethod
    def from_dict(raw: dict, path: Path = Path("."), dtype=None, generation_config: dict | None = None,
                  where: Path | None = None, quantization: str | None = None,
                  kv_cache_dtype: str | None = None) -> "ModelConfig":
        from ziggurat.models import quantization as fp8

        where = where or path / "config.json"

        def get(name, typ, default=...):
            if name not in raw or raw[name] is None:
                if default is ...:
                    raise ModelConfigError(f"{where}: missing field '{name}'")
                return default
            v = raw[name]
            if typ is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
                raise ModelConfigError(f"{where}: field '{name}' must be {typ.__name__}, got {v!r}")
            return v

        archs = raw.get("architectures")
        if not archs or not isinstance(archs, list):
            raise ModelConfigError(f"{where}: missing field 'architectures'")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"{where}: unsupported architecture {arch!r}; supported: "
                + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            )
        flags = SUPPORTED_ARCHITECTURES[arch]
        hidden = get("hidden_size", int)
        heads = get("num_attention_heads", int)
        kv_heads = get("num_key_value_heads", int, heads)
        head_dim = get("head_dim", int, None) or hidden // heads
        if heads % kv_heads:
            raise ModelConfigError(
                f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        if get("hidden_act", str, "silu") != "silu":
            raise ModelConfigError(f"{where}: field 'hidden_act' must be 'silu', got {raw['hidden_act']!r}")
        num_layers = get("num_hidden_layers", int)

        # RoPE: classic fields (rope_theta + rope_scaling) or transformers 5's
        # rope_parameters, which carries rope_theta inside it.
        rope_params = raw.get("rope_parameters") or None
        rope_scaling = raw.get("rope_scaling") or None
        theta = raw.get("rope_theta")
        if rope_params:
            theta = rope_params.get("rope_theta", theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rtype not in ("default", "llama3", "linear", "freq_factors"):  # freq_factors: from a GGUF
                raise ModelConfigError(f"{where}: unsupported rope_scaling type {rtype!r}; supported: llama3, linear")
            if rtype == "default":
                rope_scaling = None
        theta = float(theta if theta is not None else 10000.0)

        if flags["qkv_bias"] is None:  # llama / qwen3 read it from the config
            qkv_bias = bool(raw.get("attention_bias", False))
            o_bias = qkv_bias
        else:
            qkv_bias, o_bias = flags["qkv_bias"], False
        windows = _sliding_windows(raw, arch, num_layers)

        cfg_dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        eos = raw.get("eos_token_id")
        if generation_config and generation_config.get("eos_token_id") is not None:
            eos = generation_config["eos_token_id"]
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return ModelConfig(
            path=path,
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=get("vocab_size", int),
            max_position_embeddings=get("max_position_embeddings", int, 4096),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=flags["qk_norm"],
            sliding_windows=windows,
            dtype=parse_dtype(dtype if dtype is not None else cfg_dtype, "dtype" if dtype is not None else f"{where}: torch_dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quantization=fp8.resolve(fp8.parse_config(raw.get("quantization_config"), where), quantization),
            kv_cache_dtype=fp8.kv_cache_torch_dtype(kv_cache_dtype),
        )


def _sliding_windows(raw: dict, arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not raw.get("use_sliding_window", False):
        window = None
    layer_types = raw.get("layer_types")
    if window is None:
        return (None,) * num_layers
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if arch == "MistralForCausalLM":
        return (window,) * num_layers
    first_sliding = raw.get("max_window_layers", num_layers)
    return tuple(window if i >= first_sliding else None for i in range(num_layers))


# generation_config.json's keys that become request defaults, as vLLM applies them
# (a request's own value wins; max_new_tokens becomes max_tokens).
GENERATION_DEFAULTS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                       "repetition_penalty": float, "max_new_tokens": int}


def sampling_defaults(path: str | Path) -> dict:
    """The sampling defaults a model's generation_config.json sets: SamplingParams field -> value."""
    path = Path(path)
    gen = _read_generation_config(path) if path.is_dir() else None
    out = {}
    for key, typ in GENERATION_DEFAULTS.items():
        v = (gen or {}).get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out["max_tokens" if key == "max_new_tokens" else key] = typ(v)
    return out


def _read_generation_config(path: Path) -> dict | None:
    f = path / "generation_config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{f}: not valid JSON ({e})") from None
