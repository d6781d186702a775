"""Write a random-weight, HuggingFace-format causal LM checkpoint directory.

The directory holds ``config.json``, ``generation_config.json``, the weights
(``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards plus
``model.safetensors.index.json``), ``tokenizer.json`` and
``tokenizer_config.json``; ``transformers.AutoModelForCausalLM`` and
``AutoTokenizer`` load it with no missing or unexpected weights.

This module runs at serve time, where transformers is absent: it imports only
torch, safetensors, tokenizers and the standard library.

    python -m ziggurat.models.maker OUT --arch qwen3 --preset tiny \
        --dtype bfloat16 --no-tie --kv-heads 1 --shard-size 2GB --set num_hidden_layers=3

``--quantize fp8`` writes an llm-compressor (compressed-tensors) FP8 checkpoint
instead: the decoder's linear weights as float8_e4m3fn with per-channel
``weight_scale`` [out, 1] (in the model dtype), activations dynamic per token,
lm_head and embeddings left in the model dtype (models/quantization.py reads it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import random
import re
import struct
import sys
import zlib
from typing import Any, Iterable

import torch

from ziggurat.config import QUANTIZATION_METHODS

__all__ = ["ARCHITECTURES", "PRESETS", "make_model", "main"]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
PRESETS = ("tiny", "qwen3-0.6b", "llama-3.1-8b")

_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Which tokenizer / chat-template family an architecture uses.
_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen", "qwen3": "qwen"}

# transformers_version written into config.json / generation_config.json, as
# a checkpoint saved by a 4.x release would carry (we cannot import transformers).
_TRANSFORMERS_VERSION = "4.51.0"

_LLAMA3_ROPE_8B = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Shapes of the presets.  ``tie`` None means "the architecture's default"
# (tied for qwen3, untied otherwise); ``rope_scaling`` applies to llama only.
# ``head_dim`` may be a dict keyed by arch (tiny qwen3 exercises an explicit
# head_dim != hidden / heads).
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim={"default": 16, "qwen3": 32},
        intermediate_size=128,
        max_position_embeddings=2048,
        vocab_size=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        tie=None,
        tokenizer_vocab=1000,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        max_position_embeddings=40960,
        vocab_size=151936,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        tie=True,
        tokenizer_vocab=8000,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        max_position_embeddings=131072,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling=_LLAMA3_ROPE_8B,
        tie=False,
        tokenizer_vocab=8000,
    ),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# Above this many bytes a single-file checkpoint is streamed tensor by tensor
# (byte-identical to save_file) instead of being built in memory.
_STREAM_THRESHOLD = 1 << 30

WEIGHT_STD = 0.02
BIAS_STD = 0.02
NORM_NOISE = 0.05


# --------------------------------------------------------------------------
# config


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAME:
            raise ValueError(f"unsupported dtype {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def build_config(
    arch: str = "llama",
    preset: str = "tiny",
    *,
    dtype: str | torch.dtype = "float32",
    tie_word_embeddings: bool | None = None,
    num_kv_heads: int | None = None,
    overrides: dict | None = None,
    special_ids: dict[str, int] | None = None,
) -> dict:
    """The config.json dict (without writing anything)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHITECTURES}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    p = _PRESETS[preset]
    tdtype = _resolve_dtype(dtype)
    head_dim = p["head_dim"]
    if isinstance(head_dim, dict):
        head_dim = head_dim.get(arch, head_dim["default"])
    tie = tie_word_embeddings
    if tie is None:
        tie = p["tie"] if p["tie"] is not None else (arch == "qwen3")
    if special_ids is None:
        config_vocab = int((overrides or {}).get("vocab_size", p["vocab_size"]))
        special_ids = _special_ids(_FAMILY[arch], _tokenizer_vocab(preset, config_vocab))

    cfg: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[arch]],
        "model_type": arch,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": head_dim,
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_theta": p["rope_theta"],
        "rope_scaling": None,
        "tie_word_embeddings": bool(tie),
        "torch_dtype": _DTYPE_NAME[tdtype],
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": p["vocab_size"],
    }
    fam = _FAMILY[arch]
    if fam == "llama":
        cfg["bos_token_id"] = special_ids["bos"]
        # As Llama 3.1 Instruct: both end-of-text and end-of-turn end generation.
        cfg["eos_token_id"] = [special_ids["eot_text"], special_ids["eot_turn"]]
    else:
        # As Qwen3: bos is <|endoftext|> (never prepended), eos is <|im_end|>.
        cfg["bos_token_id"] = special_ids["eot_text"]
        cfg["eos_token_id"] = special_ids["eot_turn"]

    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
        cfg["pretraining_tp"] = 1
        cfg["rope_scaling"] = copy.deepcopy(p["rope_scaling"])
    elif arch == "mistral":
        cfg["sliding_window"] = None
    elif arch == "qwen2":
        # Real Qwen2 configs carry no attention_bias: q/k/v biases are implied.
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = p["max_position_embeddings"]
        cfg["max_window_layers"] = p["num_hidden_layers"]
    elif arch == "qwen3":
        cfg["attention_bias"] = False
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = p["num_hidden_layers"]

    if num_kv_heads is not None:
        cfg["num_key_value_heads"] = int(num_kv_heads)
    overrides = dict(overrides or {})
    if "max_window_layers" in cfg and "max_window_layers" not in overrides:
        cfg["max_window_layers"] = overrides.get("num_hidden_layers", cfg["num_hidden_layers"])
    if "torch_dtype" in overrides:
        cfg["torch_dtype"] = _DTYPE_NAME[_resolve_dtype(overrides.pop("torch_dtype"))]
    cfg.update(overrides)

    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if kv < 1 or h % kv:
        raise ValueError(f"num_key_value_heads={kv} must divide num_attention_heads={h}")
    return dict(sorted(cfg.items()))


def weight_specs(cfg: dict, live_vocab: int | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) for every tensor, in HF state-dict order.

    kind is "matrix", "bias" or "norm".
    """
    arch = cfg["model_type"]
    hid = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or hid // nh
    vocab = cfg["vocab_size"]
    if arch == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False)) if arch == "llama" else False

    # The output projection's rows for ids past the tokenizer (config vocab
    # sizes are padded well beyond what a small local tokenizer covers) are
    # zero, as untrained reserved rows are near zero in real checkpoints: their
    # logit is 0, so greedy decoding stays on ids that decode to text.
    out_kind = f"vocab:{live_vocab}" if live_vocab is not None and live_vocab < vocab else "matrix"
    tied = cfg.get("tie_word_embeddings", False)
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hid),
                                                      out_kind if tied else "matrix")]
    for i in range(cfg["num_hidden_layers"]):
        a = f"model.layers.{i}.self_attn"
        for proj, out_f, in_f, bias in (
            ("q_proj", nh * hd, hid, qkv_bias),
            ("k_proj", nkv * hd, hid, qkv_bias),
            ("v_proj", nkv * hd, hid, qkv_bias),
            ("o_proj", hid, nh * hd, o_bias),
        ):
            specs.append((f"{a}.{proj}.weight", (out_f, in_f), "matrix"))
            if bias:
                specs.append((f"{a}.{proj}.bias", (out_f,), "bias"))
        if arch == "qwen3":
            specs.append((f"{a}.q_norm.weight", (hd,), "norm"))
            specs.append((f"{a}.k_norm.weight", (hd,), "norm"))
        m = f"model.layers.{i}.mlp"
        for proj, out_f, in_f in (("gate_proj", inter, hid), ("up_proj", inter, hid), ("down_proj", hid, inter)):
            specs.append((f"{m}.{proj}.weight", (out_f, in_f), "matrix"))
            if mlp_bias:
                specs.append((f"{m}.{proj}.bias", (out_f,), "bias"))
        specs.append((f"model.layers.{i}.input_layernorm.weight", (hid,), "norm"))
        specs.append((f"model.layers.{i}.post_attention_layernorm.weight", (hid,), "norm"))
    specs.append(("model.norm.weight", (hid,), "norm"))
    if not tied:
        specs.append(("lm_head.weight", (vocab, hid), out_kind))
    return specs


# --------------------------------------------------------------------------
# weights


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seeds: values do not depend on generation order or sharding.
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def _make_tensor(name: str, shape, kind: str, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(_tensor_seed(seed, name))
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device=device)
    if kind == "norm":
        t.mul_(NORM_NOISE).add_(1.0)
    elif kind == "bias":
        t.mul_(BIAS_STD)
    else:
        t.mul_(WEIGHT_STD)
        if kind.startswith("vocab:"):
            t[int(kind[6:]):] = 0
    return t.to(dtype).cpu().contiguous()


def parse_size(size: str | int | None) -> int | None:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, 123 -> 123 (HF conventions)."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    s = str(size).strip().upper().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGT]I?B?|B)?", s)
    if not m:
        raise ValueError(f"bad size {size!r} (e.g. 2GB, 500MiB, 1000000)")
    num, unit = float(m.group(1)), (m.group(2) or "B")
    if unit == "B":
        mult = 1
    else:
        power = "KMGT".index(unit[0]) + 1
        mult = (1024 if "I" in unit else 1000) ** power
    return int(num * mult)


def _plan_shards(specs, itemsize: int, max_shard_bytes: int, size_of=None) -> list[list[int]]:
    """Greedy split in state-dict order, as huggingface_hub does. size_of(spec): bytes, if not numel * itemsize."""
    shards: list[list[int]] = []
    cur: list[int] = []
    cur_size = 0
    for i, (_, shape, _) in enumerate(specs):
        nbytes = _numel(shape) * itemsize if size_of is None else size_of(specs[i])
        if cur and cur_size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(i)
        cur_size += nbytes
    if cur:
        shards.append(cur)
    return shards


def _st_header(entries: list[tuple[str, tuple[int, ...], str, int]], metadata: dict[str, str]) -> bytes:
    """safetensors header for entries (name, shape, st_dtype, nbytes), already in file order."""
    parts = ['"__metadata__":' + json.dumps(metadata, separators=(",", ":"))]
    off = 0
    for name, shape, st_dtype, nbytes in entries:
        info = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        parts.append(json.dumps(name) + ":" + json.dumps(info, separators=(",", ":")))
        off += nbytes
    buf = ("{" + ",".join(parts) + "}").encode()
    buf += b" " * ((8 - len(buf) % 8) % 8)
    return struct.pack("<Q", len(buf)) + buf


def _generate(specs, dtype, seed, device, window: int | None = None):
    """Yield (name, tensor) in ``specs`` order.

    On CPU, up to ``window`` tensors are generated concurrently on threads
    (torch releases the GIL; per-tensor seeds keep the values independent of
    scheduling), so at most ``window`` tensors are alive beyond the consumer's.
    """
    if window is None:
        window = 1 if device != "cpu" else max(1, min(8, os.cpu_count() or 1))
    if window == 1:
        for name, shape, kind in specs:
            yield name, _make_tensor(name, shape, kind, dtype, seed, device)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=window) as pool:
        pending: deque = deque()
        it = iter(specs)
        for name, shape, kind in it:
            pending.append((name, pool.submit(_make_tensor, name, shape, kind, dtype, seed, device)))
            if len(pending) >= window:
                break
        while pending:
            name, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(_make_tensor, *nxt, dtype, seed, device)))
            yield name, fut.result()


def _stream_safetensors(path: pathlib.Path, specs, dtype, seed, device) -> None:
    """Write one safetensors file generating one tensor at a time.

    Byte-identical to ``safetensors.torch.save_file`` (all tensors share one
    dtype, so the file order is simply by name).
    """
    order = sorted(specs, key=lambda s: s[0])
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = [(n, tuple(shape), _ST_DTYPE[dtype], _numel(shape) * itemsize) for n, shape, _ in order]
    with open(path, "wb") as f:
        f.write(_st_header(entries, {"format": "pt"}))
        for _, t in _generate(order, dtype, seed, device):
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
            del t


def _save_group(path: pathlib.Path, specs, dtype, seed, device, stream: bool) -> None:
    if stream:
        _stream_safetensors(path, specs, dtype, seed, device)
        return
    from safetensors.torch import save_file

    tensors = dict(_generate(specs, dtype, seed, device))
    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------
# FP8 (compressed-tensors) checkpoints

QUANTIZE = QUANTIZATION_METHODS  # what --quantize writes: the methods the engine reads
_FP8_WEIGHT = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def fp8_quantization_config() -> dict:
    """config.json's quantization_config, as llm-compressor's FP8_DYNAMIC scheme writes it."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
                        "group_size": None, "block_structure": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                  "dynamic": True, "observer": None},
            "output_activations": None,
        }},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def _fp8_entries(spec, dtype):
    """(name, shape, safetensors dtype, bytes) of what one tensor spec becomes in an FP8 file."""
    name, shape, _ = spec
    if not _FP8_WEIGHT.search(name):
        return [(name, tuple(shape), _ST_DTYPE[dtype], _numel(shape) * dtype.itemsize)]
    return [(name, tuple(shape), "F8_E4M3", _numel(shape)), (name + "_scale", (shape[0], 1), _ST_DTYPE[dtype],
                                                               shape[0] * dtype.itemsize)]


def _fp8_tensors(name: str, t: torch.Tensor) -> list[torch.Tensor]:
    if not _FP8_WEIGHT.search(name):
        return [t]
    from ziggurat.models.quantization import quantize_weight  # the same function as quantize-at-load

    q, scale = quantize_weight(t, t.dtype)
    return [q, scale.reshape(-1, 1)]


def _save_fp8_group(path: pathlib.Path, specs, dtype, seed, device) -> None:
    """One FP8 safetensors file, streamed a tensor at a time. Sorted by name, each
    weight_scale follows its weight, so entries come in the specs' sorted order."""
    order = sorted(specs, key=lambda s: s[0])
    entries = [e for sp in order for e in _fp8_entries(sp, dtype)]
    assert [e[0] for e in entries] == sorted(e[0] for e in entries)
    with open(path, "wb") as f:
        f.write(_st_header(entries, {"format": "pt"}))
        for name, t in _generate(order, dtype, seed, device):
            for part in _fp8_tensors(name, t):
                f.write(memoryview(part.contiguous().view(-1).view(torch.uint8).numpy()))


def write_weights(out: pathlib.Path, cfg: dict, *, dtype, seed: int = 0, max_shard_bytes: int | None = None,
                  device: str = "cpu", stream_threshold: int | None = None, live_vocab: int | None = None,
                  quantize: str | None = None) -> list[str]:
    """Write the weights for ``cfg``; returns the file names written. Rows of
    the output projection for ids >= live_vocab are zero (see weight_specs).
    quantize="fp8": the FP8 layout (see fp8_quantization_config)."""
    tdtype = _resolve_dtype(dtype)
    specs = weight_specs(cfg, live_vocab)
    if quantize is not None:
        return _write_fp8(out, specs, tdtype, seed, max_shard_bytes, device)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    total = sum(_numel(s) for _, s, _ in specs) * itemsize
    threshold = _STREAM_THRESHOLD if stream_threshold is None else stream_threshold
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if stale.is_file():
            stale.unlink()
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save_group(out / "model.safetensors", specs, tdtype, seed, device, stream=total > threshold)
        return ["model.safetensors"]
    shards = _plan_shards(specs, itemsize, int(max_shard_bytes))
    n = len(shards)
    names, weight_map = [], {}
    for k, idx in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        group = [specs[i] for i in idx]
        size = sum(_numel(s) for _, s, _ in group) * itemsize
        _save_group(out / fname, group, tdtype, seed, device, stream=size > threshold)
        names.append(fname)
        for name, _, _ in group:
            weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + ["model.safetensors.index.json"]


def _write_fp8(out: pathlib.Path, specs, tdtype, seed, max_shard_bytes, device) -> list[str]:
    size_of = lambda sp: sum(e[3] for e in _fp8_entries(sp, tdtype))  # noqa: E731
    total = sum(map(size_of, specs))
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        if stale.is_file():
            stale.unlink()
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save_fp8_group(out / "model.safetensors", specs, tdtype, seed, device)
        return ["model.safetensors"]
    shards = _plan_shards(specs, 0, int(max_shard_bytes), size_of)
    names, weight_map = [], {}
    for k, idx in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        group = [specs[i] for i in idx]
        _save_fp8_group(out / fname, group, tdtype, seed, device)
        names.append(fname)
        weight_map.update({e[0]: fname for sp in group for e in _fp8_entries(sp, tdtype)})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + ["model.safetensors.index.json"]


# --------------------------------------------------------------------------
# tokenizer

_SPECIALS = {
    # family -> [(role, content)] in id order (appended after the BPE vocab)
    "llama": [
        ("bos", "<|begin_of_text|>"),
        ("eot_text", "<|end_of_text|>"),
        ("start_header", "<|start_header_id|>"),
        ("end_header", "<|end_header_id|>"),
        ("eot_turn", "<|eot_id|>"),
    ],
    "qwen": [
        ("eot_text", "<|endoftext|>"),
        ("im_start", "<|im_start|>"),
        ("eot_turn", "<|im_end|>"),
    ],
}

_LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "out up about into them some could time than first other then its two may only new these over any "
    "after most people like also made what year should work between well where many must through back "
    "being under great state still because those while world good against every model token layer "
    "attention weight matrix vector memory cache server request batch stream kernel device tensor "
    "inference network language system number value function return string python query answer "
    "question river mountain garden window morning evening summer winter yellow purple quickly "
    "slowly beautiful important different possible available interesting understanding information "
    "development government international environment performance"
).split()
_SYLLABLES = (
    "ba be bi bo bu ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re ri ro ru "
    "sa se si so su ta te ti to tu va ve vi vo vu za ze zi zo zu tha the thi tho str pro con ex "
    "ment tion ing er est ly al ous ive able ism ist ward ship ness ful less dor gen lex mar quin "
    "vel zor phy chro tra pla gri fen"
).split()
_NON_ASCII = (
    "café naïve résumé façade jalapeño Übermaß straße smörgåsbord crème brûlée déjà vu "
    "日本語 東京 こんにちは 世界 中文 你好 한국어 안녕하세요 Привет мир Ελληνικά שלום مرحبا नमस्ते "
    "😀 🚀 🎉 👍 ❤️ 🤖 ∑ ∫ √ π ≈ ≠ ≤ ≥ → ← • … “quoted” ‘single’ — – € £ ¥ ©"
).split()
_CODE = [
    "def {w}({v}):\n    return {v} + {n}\n",
    "for i in range({n}):\n    print(i, \"{w}\")\n",
    "if ({v} >= {n}) {{ {w}[{v}] = {n}; }}\n",
    "class {W}:\n    def __init__(self, {v}=None):\n        self.{v} = {v}\n",
    "const {v} = {{ \"{w}\": {n}, \"ok\": true }};\n",
    "x_{n} = [{n}, {n}, {n}]  # {w}\n",
    "<div class=\"{w}\">{W} &amp; {v}</div>\n",
    "SELECT {v} FROM {w} WHERE id = {n};\n",
]


def _corpus(n_chars: int = 300_000, seed: int = 1234) -> str:
    rng = random.Random(seed)
    # Zipf-ish lexicon: real words plus a few thousand pseudo-words.
    lex = list(_WORDS)
    seen = set(lex)
    while len(lex) < 6000:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        if w not in seen:
            seen.add(w)
            lex.append(w)
    weights = [1.0 / (r + 1) ** 0.9 for r in range(len(lex))]
    parts: list[str] = []
    size = 0
    while size < n_chars:
        r = rng.random()
        if r < 0.08:
            tpl = rng.choice(_CODE)
            w = rng.choice(lex)
            s = tpl.format(w=w, W=w.capitalize(), v=rng.choice(("x", "y", "val", "idx", "buf")),
                           n=rng.randint(0, 9999))
        elif r < 0.14:
            s = " ".join(rng.choice(_NON_ASCII) for _ in range(rng.randint(2, 8))) + "\n"
        elif r < 0.18:
            s = f"{rng.randint(0, 10**rng.randint(1, 9))}.{rng.randint(0, 99):02d} {rng.randint(1900, 2030)}-" \
                f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} ({rng.random():.4f}%)\n"
        else:
            words = rng.choices(lex, weights, k=rng.randint(4, 18))
            if rng.random() < 0.15:
                words.insert(rng.randrange(len(words)), rng.choice(_NON_ASCII))
            words[0] = words[0].capitalize()
            s = " ".join(words) + rng.choice((".", ".", ".", "?", "!", ";", ":", ",")) + rng.choice((" ", " ", "\n"))
        parts.append(s)
        size += len(s)
    return "".join(parts)


# Pre-tokenizer split patterns of the real tokenizers: Llama 3 groups digits in
# threes, Qwen2/3 splits every digit.  (transformers 5 rebuilds a qwen2
# model_type's tokenizer as Qwen2Tokenizer with exactly the Qwen pattern and an
# NFC normalizer, so tokenizer.json must match it to tokenize identically.)
_SPLIT_PATTERN = {
    "llama": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

_BASE_TOKENIZERS: dict[tuple[str, int], str] = {}  # (family, BPE vocab) -> tokenizer JSON, no specials


def _base_tokenizer_json(family: str, vocab: int) -> str:
    key = (family, vocab)
    if key not in _BASE_TOKENIZERS:
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        if family == "qwen":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN[family]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        lines = _corpus().splitlines(keepends=True)
        tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
        _BASE_TOKENIZERS[key] = tok.to_str()
    return _BASE_TOKENIZERS[key]


def _tokenizer_vocab(preset: str, config_vocab: int) -> int:
    """BPE vocab size (without special tokens) for a preset and config vocab_size."""
    want = _PRESETS[preset]["tokenizer_vocab"]
    fits = config_vocab - 8  # room for the special tokens
    if fits < 300:
        raise ValueError(f"vocab_size={config_vocab} is too small (need >= 308 for the byte-level tokenizer)")
    return min(want, fits)


def _special_ids(family: str, bpe_vocab: int) -> dict[str, int]:
    # Assumes the trainer reached bpe_vocab exactly (the corpus is large enough);
    # build_tokenizer checks this.
    return {role: bpe_vocab + i for i, (role, _) in enumerate(_SPECIALS[family])}


def build_tokenizer(family: str, bpe_vocab: int):
    """A tokenizers.Tokenizer for a family ("llama" or "qwen") and returns (tokenizer, special ids)."""
    from tokenizers import AddedToken, Tokenizer, processors

    tok = Tokenizer.from_str(_base_tokenizer_json(family, bpe_vocab))
    if tok.get_vocab_size() != bpe_vocab:
        raise RuntimeError(f"BPE trainer reached {tok.get_vocab_size()} tokens, wanted {bpe_vocab}")
    specials = _SPECIALS[family]
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for _, c in specials])
    ids = {role: tok.token_to_id(c) for role, c in specials}
    assert ids == _special_ids(family, bpe_vocab), ids
    byte_level = processors.ByteLevel(trim_offsets=False)
    if family == "llama":
        bos = specials[0][1]
        tok.post_processor = processors.Sequence([
            byte_level,
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, ids["bos"])],
            ),
        ])
    else:
        tok.post_processor = byte_level
    return tok, ids


def _tokenizer_config(family: str, tok, ids: dict[str, int], model_max_length: int) -> dict:
    specials = dict(_SPECIALS[family])
    added = {}
    for role, content in _SPECIALS[family]:
        added[str(ids[role])] = {
            "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
    cfg = {
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "eos_token": specials["eot_turn"],
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(model_max_length),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if family == "llama":
        cfg["bos_token"] = specials["bos"]
        cfg["pad_token"] = specials["eot_text"]
        cfg["chat_template"] = _LLAMA_CHAT_TEMPLATE
    else:
        cfg["bos_token"] = None
        cfg["pad_token"] = specials["eot_text"]
        cfg["add_bos_token"] = False
        cfg["unk_token"] = None
        cfg["errors"] = "replace"
        cfg["split_special_tokens"] = False
        cfg["chat_template"] = _QWEN_CHAT_TEMPLATE
    return dict(sorted(cfg.items()))


# --------------------------------------------------------------------------
# entry points


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_model(
    path,
    arch: str = "llama",
    preset: str = "tiny",
    *,
    dtype: str = "float32",
    tie_word_embeddings: bool | None = None,
    num_kv_heads: int | None = None,
    max_shard_bytes: int | str | None = None,
    seed: int = 0,
    overrides: dict | None = None,
    device: str = "cpu",
    quantize: str | None = None,
) -> pathlib.Path:
    """Write a random-weight HF checkpoint (config, weights, tokenizer) to ``path``.
    quantize="fp8": an FP8 (compressed-tensors) checkpoint of the same weights."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; choose from {QUANTIZE}")
    out = pathlib.Path(path)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHITECTURES}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    family = _FAMILY[arch]
    config_vocab = int((overrides or {}).get("vocab_size", _PRESETS[preset]["vocab_size"]))
    bpe_vocab = _tokenizer_vocab(preset, config_vocab)
    tok, ids = build_tokenizer(family, bpe_vocab)
    cfg = build_config(arch, preset, dtype=dtype, tie_word_embeddings=tie_word_embeddings,
                       num_kv_heads=num_kv_heads, overrides=overrides, special_ids=ids)
    if tok.get_vocab_size() > cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens > vocab_size={cfg['vocab_size']}")
    if quantize == "fp8":
        cfg["quantization_config"] = fp8_quantization_config()

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    if family == "llama":
        gen_eos = [ids["eot_text"], ids["eot_turn"]]
        gen_bos = ids["bos"]
    else:
        gen_eos = [ids["eot_turn"], ids["eot_text"]]
        gen_bos = ids["eot_text"]
    _write_json(out / "generation_config.json", {
        "bos_token_id": gen_bos,
        "eos_token_id": gen_eos,
        "transformers_version": _TRANSFORMERS_VERSION,
    })
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json",
                _tokenizer_config(family, tok, ids, cfg["max_position_embeddings"]))
    write_weights(out, cfg, dtype=cfg["torch_dtype"], seed=seed,
                  max_shard_bytes=parse_size(max_shard_bytes), device=device, live_vocab=tok.get_vocab_size(),
                  quantize=quantize)
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ziggurat.models.maker",
                                 description="Write a random-weight HuggingFace-format causal LM.")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None,
                    help="tie lm_head to the embeddings (default: the preset's)")
    ap.add_argument("--kv-heads", type=int, default=None, help="num_key_value_heads")
    ap.add_argument("--shard-size", default=None, help="max shard size, e.g. 2GB, 500MiB, 1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where to generate the weights (cpu, cuda)")
    ap.add_argument("--quantize", choices=QUANTIZE, default=None,
                    help="fp8: an FP8 checkpoint (compressed-tensors, per-channel weights, dynamic per-token "
                         "activations), the same weights as without it")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.json field; VALUE is parsed as JSON when it can be")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.sets:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = _parse_value(v)
    try:
        out = make_model(args.out, args.arch, args.preset, dtype=args.dtype, tie_word_embeddings=args.tie,
                         num_kv_heads=args.kv_heads, max_shard_bytes=parse_size(args.shard_size),
                         seed=args.seed, overrides=overrides or None, device=args.device, quantize=args.quantize)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
