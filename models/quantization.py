"""FP8 weights: which checkpoints we read, and how a model's linear layers hold them.

Formats read (config.json's `quantization_config`):

    compressed-tensors (llm-compressor)   quant_method "compressed-tensors", format "float-quantized";
        config_groups.*.weights {num_bits 8, type float, symmetric, strategy tensor|channel},
        input_activations {dynamic true (strategy token) | false (strategy tensor: *.input_scale)}
        or none (weight-only); `ignore` lists modules left in 16 bits (e.g. lm_head).
    vLLM fp8                              quant_method "fp8", activation_scheme dynamic|static,
        per-tensor *.weight_scale (or *.weight_scale_inv); weight_block_size is refused.

and `--quantization fp8` quantizes a 16-bit checkpoint at load (per output channel,
dynamic per-token activations): `quantize_weight` below, the same function
`make-model --quantize fp8` writes checkpoints with.

One representation whatever the source, so one compute path (kernels/fp8.py):

    layer.weight        float8_e4m3fn [N_local, K_local]
    layer.weight_scale  float32 [N_local]       w ~= weight * weight_scale[:, None]
    layer.input_scale   float32 [1] or None     static activation scale; None = per token, at run time

A per-tensor scale is expanded into the per-channel vector. For fused layers
(qkv, gate_up) each checkpoint shard keeps its own scale over its own rows, so
nothing is requantized (a common scale would round every shard a second time
and lose the smaller shards' range); the kernels take a channel vector anyway.
Static input scales of a fused layer's shards (one activation seen by q, k and
v) are merged by max, so no shard's calibrated range clips.

FP8 KV cache: each attention layer's k_scale / v_scale (1.0 unless the
checkpoint has `self_attn.k_scale` / `v_scale`, or `k_proj` / `v_proj.output_scale`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ziggurat.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE
from ziggurat.models.config import ModelConfigError


class QuantizationError(ModelConfigError):
    pass


@dataclass(frozen=True)
class FP8Spec:
    """How a model's linear layers are quantized."""

    source: str  # "checkpoint": fp8 tensors in the files; "load": 16-bit files quantized at load
    weight_strategy: str = "channel"  # per output "channel" or per "tensor" (checkpoint layout)
    dynamic_activations: bool = True  # per-token scales at run time; False: the checkpoint's input_scale
    ignore: tuple[str, ...] = ()  # checkpoint module names (or "re:" patterns) left unquantized

    def ignored(self, module: str) -> bool:
        for pat in self.ignore:
            if pat.startswith("re:") and re.fullmatch(pat[3:], module) or pat == module:
                return True
        return False


# -- config parsing ---------------------------------------------------------------


def parse_config(raw: dict | None, where: Path) -> FP8Spec | None:
    """config.json's quantization_config -> FP8Spec, None if absent; errors name the field."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise QuantizationError(f"{where}: quantization_config must be an object")
    method = raw.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(raw, where)
    if method == "fp8":
        return _vllm_fp8(raw, where)
    raise QuantizationError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                            f"(supported: compressed-tensors float-quantized FP8, fp8)")


def _compressed_tensors(raw: dict, where: Path) -> FP8Spec:
    f = "quantization_config"
    fmt = raw.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise QuantizationError(f"{where}: {f}.format {fmt!r} is not supported (float-quantized FP8 only)")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantizationError(f"{where}: {f}.config_groups must be a non-empty object")
    specs = []
    for gname, g in groups.items():
        at = f"{f}.config_groups.{gname}"
        if not isinstance(g, dict):
            raise QuantizationError(f"{where}: {at} must be an object")
        targets = g.get("targets", ["Linear"])
        if targets != ["Linear"]:
            raise QuantizationError(f"{where}: {at}.targets {targets!r} is not supported (only [\"Linear\"])")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise QuantizationError(f"{where}: {at}.weights must be an object")
        _expect(w, "num_bits", (8,), where, f"{at}.weights")
        _expect(w, "type", ("float",), where, f"{at}.weights")
        _expect(w, "strategy", ("tensor", "channel"), where, f"{at}.weights")
        if w.get("symmetric", True) is not True:
            raise QuantizationError(f"{where}: {at}.weights.symmetric must be true (FP8 has no zero point)")
        if w.get("dynamic", False):
            raise QuantizationError(f"{where}: {at}.weights.dynamic must be false")
        a = g.get("input_activations")
        dynamic = True  # weight-only checkpoints: activations are ours to treat, per token
        if a is not None:
            at_a = f"{at}.input_activations"
            if not isinstance(a, dict):
                raise QuantizationError(f"{where}: {at_a} must be an object or null")
            _expect(a, "num_bits", (8,), where, at_a)
            _expect(a, "type", ("float",), where, at_a)
            dynamic = a.get("dynamic")
            if dynamic not in (True, False):
                raise QuantizationError(f"{where}: {at_a}.dynamic must be true or false, got {dynamic!r}")
            _expect(a, "strategy", ("token",) if dynamic else ("tensor",), where, at_a)
        if g.get("output_activations") is not None:
            raise QuantizationError(f"{where}: {at}.output_activations is not supported")
        specs.append((w["strategy"], dynamic))
    if len(set(specs)) > 1:
        raise QuantizationError(f"{where}: {f}.config_groups differ ({specs}); one FP8 scheme for every layer only")
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(s, str) for s in ignore):
        raise QuantizationError(f"{where}: {f}.ignore must be a list of module names")
    strategy, dynamic = specs[0]
    return FP8Spec("checkpoint", strategy, dynamic, tuple(ignore))


def _vllm_fp8(raw: dict, where: Path) -> FP8Spec:
    f = "quantization_config"
    if raw.get("weight_block_size") is not None:
        raise QuantizationError(f"{where}: {f}.weight_block_size (block-wise FP8) is not supported; "
                                f"per-tensor and per-channel scales only")
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise QuantizationError(f"{where}: {f}.activation_scheme must be dynamic or static, got {scheme!r}")
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantizationError(f"{where}: {f}.fmt {fmt!r} is not supported (e4m3 only)")
    ignore = raw.get("ignored_layers") or raw.get("modules_to_not_convert") or []
    return FP8Spec("checkpoint", "tensor", scheme == "dynamic", tuple(ignore))


def _expect(d: dict, key: str, allowed: tuple, where: Path, at: str) -> None:
    if d.get(key) not in allowed:
        raise QuantizationError(f"{where}: {at}.{key} must be one of {list(allowed)}, got {d.get(key)!r}")


def resolve(checkpoint: FP8Spec | None, quantization: str | None) -> FP8Spec | None:
    """The checkpoint's own scheme, or quantize-at-load when asked of a 16-bit checkpoint.
    quantization: EngineConfig's, validated there (None or one of config.QUANTIZATION_METHODS)."""
    return checkpoint if quantization is None else checkpoint or FP8Spec("load")


def kv_cache_torch_dtype(kv_cache_dtype: str | None) -> torch.dtype | None:
    """EngineConfig's kv_cache_dtype (validated there): 'fp8' -> float8_e4m3fn, 'auto'/None -> None
    (the model's dtype)."""
    return FP8 if kv_cache_dtype == "fp8" else None


# -- quantization -------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32,
                    absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: scale = absmax(row) / 448 (in scale_dtype, as stored), weight =
    round(w / scale) in e4m3 -> (fp8 [N, K], scale [N] in scale_dtype). absmax: the rows'
    absmax when w is a slice of them (a row-parallel shard: the full rows decide)."""
    amax = w.abs().amax(dim=1).float() if absmax is None else absmax.float()
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE).to(scale_dtype)
    q = (w.float() / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (w.float() * scale.float().reshape(-1, 1)).to(dtype)


# -- the model's layers ---------------------------------------------------------------


def _param(t: torch.Tensor, loader=None, shard_ids=(None,)) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t, requires_grad=False)
    if loader is not None:
        p.weight_loader, p.shard_ids = loader, shard_ids
    return p


def linear_layers(model: torch.nn.Module):
    """(name, layer) of every TP linear layer (models/linear.py)."""
    from ziggurat.models.linear import ColumnParallelLinear, RowParallelLinear

    for name, mod in model.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            yield name, mod


def _checkpoint_modules(name: str) -> list[str]:
    """The checkpoint module names fused into one of our layers (for `ignore`)."""
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    leaf = name.rsplit(".", 1)[-1]
    base = "model." + name
    return [base[: -len(leaf)] + p for p in parts.get(leaf, (leaf,))]


def prepare_model(model: torch.nn.Module, spec: FP8Spec | None, kv_cache_dtype: torch.dtype | None) -> None:
    """Before loading: FP8 checkpoints get fp8 weight parameters (and their scale
    parameters) that the loader fills; attention layers get their KV scales."""
    if kv_cache_dtype == FP8:
        for attn in model.attention_layers():
            attn.k_scale = _param(torch.ones(()), _load_kv_scale, ())  # () : optional in the checkpoint
            attn.v_scale = _param(torch.ones(()), _load_kv_scale, ())
    if spec is None or spec.source != "checkpoint":
        return
    for name, layer in linear_layers(model):
        modules = _checkpoint_modules(name)
        ignored = [spec.ignored(m) for m in modules]
        if all(ignored):
            continue
        if any(ignored):
            raise QuantizationError(f"{model.cfg.path}/config.json: quantization_config ignores only part of "
                                    f"{modules} (fused into one layer here: all or none)")
        _fp8_parameters(layer, spec)


def _fp8_parameters(layer, spec: FP8Spec) -> None:
    from ziggurat.models.linear import ColumnParallelLinear

    w = layer.weight
    shard_ids = w.shard_ids
    layer.weight = _param(torch.empty(w.shape, dtype=FP8, device=w.device), w.weight_loader, shard_ids)
    column = isinstance(layer, ColumnParallelLinear)
    loader = _column_scale_loader(layer) if column else _row_scale_loader(layer)
    scale = _param(torch.empty(w.shape[0], dtype=torch.float32, device=w.device), loader, shard_ids)
    layer.weight_scale = scale
    if not spec.dynamic_activations:
        n = len(shard_ids)
        layer.input_scale = _param(torch.zeros(n, device=w.device), _input_scale_loader(layer), shard_ids)


def _scale_values(src, rows: int, start: int, length: int) -> torch.Tensor:
    """A checkpoint scale tensor read for rows [start, start+length) of a `rows`-row
    tensor: a per-channel [rows] / [rows, 1] slice, or a per-tensor scalar broadcast."""
    numel = 1
    for s in src.shape:
        numel *= s
    if numel == 1:
        return src.read().float().reshape(1).expand(length)
    if tuple(src.shape) not in ((rows,), (rows, 1)):
        raise QuantizationError(f"{src.file}: tensor '{src.name}' has shape {list(src.shape)}, expected a "
                                f"per-tensor scale or per-channel [{rows}, 1]")
    return src.read(0, start, length).float().reshape(length)


def _column_scale_loader(layer):
    def load(param, src, shard_id=None):
        offset, local, start, full = layer._slice_for(shard_id)
        param.data[offset : offset + local].copy_(_scale_values(src, full, start, local))

    return load


def _row_scale_loader(layer):
    def load(param, src, shard_id=None):
        n = layer.out_features
        param.data.copy_(_scale_values(src, n, 0, n))

    return load


def _input_scale_loader(layer):
    index = getattr(layer, "shard_index", {None: 0})

    def load(param, src, shard_id=None):
        param.data[index[shard_id]] = _scale_values(src, 1, 0, 1)[0]

    return load


def _load_kv_scale(param, src, shard_id=None) -> None:
    param.data.copy_(_scale_values(src, 1, 0, 1)[0])


def finish_loading(model: torch.nn.Module, spec: FP8Spec | None) -> None:
    """After loading: quantize-at-load, and merge fused layers' static input scales."""
    if spec is None:
        return
    if spec.source == "load":
        for _, layer in linear_layers(model):
            _quantize_layer(layer, model.cfg.dtype)
        dev = next(model.parameters()).device
        if dev.type == "cuda":  # the 16-bit weights are gone: the KV budget must not count them as peak
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        return
    for _, layer in linear_layers(model):
        if getattr(layer, "input_scale", None) is not None and layer.input_scale.numel() > 1:
            layer.input_scale = _param(layer.input_scale.data.amax().reshape(1))


def _quantize_layer(layer, scale_dtype: torch.dtype) -> None:
    """A loaded 16-bit layer -> fp8 weight + per-channel scale, in place. A row-parallel
    shard holds part of each row: the rows' absmax is all-reduced (MAX) over the TP
    group, so every TP size quantizes to the same values as TP=1 (and as make-model)."""
    from ziggurat.models.linear import RowParallelLinear
    from ziggurat.topology.distributed import tp

    w = layer.weight.data
    amax = w.abs().amax(dim=1).float()
    g = tp()
    if isinstance(layer, RowParallelLinear) and g.size > 1:
        import torch.distributed as dist

        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=g.group)
    q, scale = quantize_weight(w, scale_dtype, amax)
    layer.weight = _param(q)
    layer.weight_scale = _param(scale.float())


def checkpoint_name(name: str, cfg) -> str | None:
    """Our name for a checkpoint tensor (its 'model.' prefix dropped) where FP8 renames
    it, None where FP8 skips it, else the name unchanged. KV scales belong to the
    attention layer (skipped without an FP8 cache); weight_scale_inv is vLLM's name
    for the same multiplier; input_scale is skipped when activations are dynamic."""
    m = re.fullmatch(r"(layers\.\d+\.self_attn)\.(?:(k|v)_scale|(k|v)_proj\.output_scale)", name)
    if m is not None:
        return f"{m.group(1)}.attn.{m.group(2) or m.group(3)}_scale" if cfg.kv_cache_dtype == FP8 else None
    if name.endswith(".weight_scale_inv"):
        return name[: -len("_inv")]
    if name.endswith(".input_scale") and (cfg.quantization is None or cfg.quantization.dynamic_activations):
        return None
    return name


def check_source(param: torch.Tensor, src, pname: str) -> None:
    """An fp8 checkpoint tensor only into an fp8 parameter, and back (a copy would cast silently)."""
    dtype = getattr(src, "dtype", None)  # safetensors' name, e.g. F8_E4M3; GGUF sources have none
    if dtype is None or (dtype == "F8_E4M3") == (param.dtype == FP8):
        return
    if dtype == "F8_E4M3":
        raise QuantizationError(f"{src.file}: tensor '{src.name}' is FP8 but {pname} is not quantized (no FP8 "
                                f"quantization_config in config.json, or quantization_config.ignore lists it)")
    if param.dtype == FP8:
        raise QuantizationError(f"{src.file}: tensor '{src.name}' is {dtype}, but quantization_config makes "
                                f"{pname} FP8 (list the module in quantization_config.ignore?)")
