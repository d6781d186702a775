"""LoRA adapters: PEFT checkpoints read into our fused, TP-sharded layout, and the slots
that hold the adapters one replica's batches use.

A PEFT LoRA adapter is a directory with adapter_config.json (r, lora_alpha,
target_modules, use_rslora, ...) and adapter_model.safetensors holding, per
adapted module, lora_A [r, in] and lora_B [out, r]; the module computes
W x + scaling * B A x, scaling = alpha / r (alpha / sqrt(r) with rsLoRA).

Our layers are fused and sharded (models/linear.py), so PEFT's per-module
pairs map onto them as:

    qkv_proj  (column)  q, k, v: A stacked by rank, B rows where the layer keeps
                        that projection's rows on this rank (its own _slice_for)
    gate_up   (column)  gate, up: likewise
    o_proj, down_proj   (row)  A's columns split like the weight's input columns,
                        B whole: each rank's partial x_r A_r^T B^T is summed by
                        the layer's one all-reduce, together with the base output

Each layer holds max_loras slots (kernels/lora.py draws the layout), zeros
where an adapter's rank is below max_lora_rank or where it leaves a module
out; scaling is folded into B. LoRAManager gives a request's adapter a slot
when the request arrives and takes it back when no live request uses it
(least recently used first); adapters read from disk stay in a host cache of
max_cpu_loras entries, so bringing one back to a slot is one copy. Every TP
rank sees the same requests in the same order, so all ranks choose the same
slots without talking.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ziggurat.kernels.lora import LoRABatch, add_lora, lora_batch
from ziggurat.sampling_params import LoRARequest

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be served; the message names the file and the field or tensor."""


@dataclass(frozen=True)
class LoRALimits:
    """A replica's LoRA capacity (config.py::EngineConfig's settings)."""

    max_loras: int  # slots: distinct adapters in the running batch at most
    max_rank: int
    max_cpu_loras: int  # adapters kept in host memory (LRU), resident without reading the disk

    @staticmethod
    def of(config) -> "LoRALimits | None":
        """An EngineConfig's limits; None when LoRA is off."""
        if not config.enable_lora:
            return None
        return LoRALimits(config.max_loras, config.max_lora_rank, config.max_cpu_loras or config.max_loras)


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """adapter_config.json checked: a plain LoRA of supported modules, or LoRAError naming the field."""
    d = Path(path)
    f = d / CONFIG_FILE
    if not d.is_dir():
        raise LoRAError(f"{d}: not a directory (a LoRA adapter is a directory with {CONFIG_FILE})")
    if not f.is_file():
        raise LoRAError(f"{f}: missing (a PEFT LoRA adapter has {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not (d / WEIGHTS_FILE).is_file():
        raise LoRAError(f"{d / WEIGHTS_FILE}: missing (only safetensors adapters are read)")
    try:
        c = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise LoRAError(f"{f}: must be a JSON object")

    def refuse(field: str, why: str):
        raise LoRAError(f"{f}: {field}: {why}")

    if c.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", f"only LORA adapters are supported, got {c.get('peft_type')!r}")
    r, alpha = c.get("r"), c.get("lora_alpha", c.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        refuse("r", f"must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        refuse("lora_alpha", f"must be a number, got {alpha!r}")
    for name, why in (("use_dora", "DoRA adapters are not supported"),
                      ("fan_in_fan_out", "transposed (Conv1D-style) weights are not supported"),
                      ("lora_bias", "LoRA biases are not supported")):
        if c.get(name):
            refuse(name, why)
    if c.get("bias", "none") != "none":
        refuse("bias", f"adapters that train biases are not supported, got {c.get('bias')!r}")
    for name in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication",
                 "target_parameters", "trainable_token_indices"):
        if c.get(name):
            refuse(name, "not supported (only plain LoRA on q/k/v/o/gate/up/down projections)")
    rslora = c.get("use_rslora", False)
    if not isinstance(rslora, bool):
        refuse("use_rslora", f"must be a boolean, got {rslora!r}")
    targets = c.get("target_modules")
    if isinstance(targets, list):
        names = tuple(t.rsplit(".", 1)[-1] for t in targets if isinstance(t, str))
        other = sorted(set(names) - set(MODULES))
        if len(names) != len(targets) or other or not names:
            refuse("target_modules", f"supported modules are {', '.join(MODULES)}; got {other or targets!r}")
        targets = names
    elif isinstance(targets, str):  # a regex or "all-linear": the tensors present decide (checked when read)
        pass
    else:
        refuse("target_modules", f"must be a list of module names or a string, got {targets!r}")
    return AdapterConfig(d, r, float(alpha), rslora, targets)


@functools.lru_cache(maxsize=256)
def _config_at(path: str, mtime_ns: int) -> AdapterConfig:
    return read_adapter_config(path)


def read_adapter_config_cached(path: str | Path) -> AdapterConfig:
    """read_adapter_config, read again only when the file changes (the per-request check)."""
    f = Path(path) / CONFIG_FILE
    try:
        mtime = f.stat().st_mtime_ns
    except OSError:
        return read_adapter_config(path)  # names what is missing
    return _config_at(str(path), mtime)


def _open(f: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except Exception as e:
        raise LoRAError(f"{f}: not a readable safetensors file ({e})") from None


def _pairs(f: Path, handle, num_layers: int) -> dict[tuple[int, str], dict[str, str]]:
    """(layer, module) -> {"A": tensor name, "B": tensor name}, every name checked."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for name in handle.keys():
        m = _TENSOR.search(name)
        if m is None or m.group(2) not in MODULES:
            raise LoRAError(f"{f}: tensor '{name}' is not a lora_A/lora_B weight of a supported module "
                            f"({', '.join(MODULES)})")
        layer = int(m.group(1))
        if layer >= num_layers:
            raise LoRAError(f"{f}: tensor '{name}' is for layer {layer}; the model has {num_layers}")
        pairs.setdefault((layer, m.group(2)), {})[m.group(3)] = name
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{f}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
    if not pairs:
        raise LoRAError(f"{f}: holds no LoRA weights")
    return pairs


def module_shapes(cfg) -> dict[str, tuple[int, int]]:
    """PEFT module -> (out, in) features of a ModelConfig's layers."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i)}


def check_adapter(path: str | Path, model_cfg) -> AdapterConfig:
    """The adapter's config, and its tensors' names and shapes against the model (the safetensors
    header only, no weights read): LoRAError naming the file and the tensor if it does not fit."""
    cfg = read_adapter_config(path)
    f = cfg.path / WEIGHTS_FILE
    shapes = module_shapes(model_cfg)
    with _open(f) as handle:
        for (_, module), ab in sorted(_pairs(f, handle, model_cfg.num_layers).items()):
            out, inp = shapes[module]
            for side, want in (("A", [cfg.rank, inp]), ("B", [out, cfg.rank])):
                got = list(handle.get_slice(ab[side]).get_shape())
                if got != want:
                    raise LoRAError(f"{f}: tensor '{ab[side]}' has shape {got}, the model needs {want} "
                                    f"(r={cfg.rank}): an adapter for another base model?")
    return cfg


def read_adapter(path: str | Path, model_cfg) -> tuple[AdapterConfig, dict[tuple[int, str], tuple]]:
    """The adapter checked against the model, and its tensors: (layer, module) -> (A [r, in], B [out, r]),
    in the file's dtype."""
    cfg = check_adapter(path, model_cfg)
    f = cfg.path / WEIGHTS_FILE
    with _open(f) as handle:
        return cfg, {key: (handle.get_tensor(ab["A"]), handle.get_tensor(ab["B"]))
                     for key, ab in sorted(_pairs(f, handle, model_cfg.num_layers).items())}


class LayerSlots:
    """One LoRA-capable layer's stacked adapter weights (kernels/lora.py's layout).

    `layer` is a ColumnParallelLinear (subs: (peft module, shard id) per fused part)
    or a RowParallelLinear (one sub)."""

    def __init__(self, layer, subs: tuple, num_slots: int, max_rank: int, dtype: torch.dtype, device):
        self.layer, self.subs, self.rank = layer, subs, max_rank
        self.row_parallel = not hasattr(layer, "local_sizes")
        if self.row_parallel:
            in_local, self.sub_sizes = layer.in_local, (layer.out_features,)
        else:
            in_local, self.sub_sizes = layer.in_features, tuple(layer.local_sizes)
        out = sum(self.sub_sizes)
        self.a = torch.zeros(num_slots, len(subs) * max_rank, in_local, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, out, max_rank, dtype=dtype, device=device)

    def shard(self, module: str, a: torch.Tensor, b: torch.Tensor, scaling: float, where: str):
        """This rank's part of one module's pair: (sub index, A rows, B row offset, B rows), checked."""
        i = next(j for j, (m, _) in enumerate(self.subs) if m == module)
        L = self.layer
        if self.row_parallel:
            full_in, full_out = L.in_full, L.out_features
        else:
            _, _, _, full_out = L._slice_for(self.subs[i][1])
            full_in = L.in_features
        if a.shape[1] != full_in or b.shape[0] != full_out:
            raise LoRAError(f"{where}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the "
                            f"model's {module} ({full_out} x {full_in})")
        b = b.float() * scaling  # folded in at full precision, rounded once to the model's dtype
        if self.row_parallel:
            return i, a[:, L.tp_rank * L.in_local : (L.tp_rank + 1) * L.in_local], 0, b
        offset, local, start, _ = L._slice_for(self.subs[i][1])
        return i, a, offset, b[start : start + local]

    def write(self, slot: int, parts: list) -> None:
        """Fill a slot from `shard` outputs (host tensors in the layer's dtype); the rest zero."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        r = self.rank
        for i, a, off, b in parts:
            k = a.shape[0]
            self.a[slot, i * r : i * r + k].copy_(a, non_blocking=True)
            self.b[slot, off : off + b.shape[0], :k].copy_(b, non_blocking=True)

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> None:
        add_lora(y, x, self.a, self.b, self.sub_sizes, batch)


class SlotTable:
    """Which adapter each slot holds and which adapters host memory keeps: the decisions
    alone, by adapter key. The workers (LoRAManager) and the scheduler
    (actors/scheduler/lora.py) run the same table over the same sequence of acquires
    and releases (a request's arrival in the workers, its row's release), so the
    scheduler knows, without asking, what every worker holds."""

    def __init__(self, num_slots: int, cpu_capacity: int):
        self.slot_key: list[str | None] = [None] * num_slots
        self.refs = [0] * num_slots
        self.last_use = [0] * num_slots
        self.cpu: OrderedDict[str, None] = OrderedDict()  # keys in host memory, least recently used first
        self.cpu_capacity = cpu_capacity
        self._clock = 0

    def acquire(self, key: str) -> tuple[int, bool, bool, list[str]]:
        """(slot, fill it, read from disk first, keys dropped from host memory) for one more user of `key`."""
        plan = self.plan(key)
        return plan + (self.commit(key, plan[0]),)

    def plan(self, key: str) -> tuple[int, bool, bool]:
        """What acquire(key) would do, changing nothing: (slot, fill it, read from disk first)."""
        if key in self.slot_key:
            return self.slot_key.index(key), False, False
        free = [j for j in range(len(self.refs)) if self.refs[j] == 0]
        if not free:
            raise RuntimeError(f"all {len(self.refs)} LoRA slots are in use (distinct adapters are capped at "
                               "max_loras)")
        return min(free, key=lambda j: (self.slot_key[j] is not None, self.last_use[j])), True, key not in self.cpu

    def commit(self, key: str, slot: int) -> list[str]:
        """Record one more user of `key` in `slot` (as planned); returns the keys dropped from host memory."""
        self._clock += 1
        evicted: list[str] = []
        if key in self.cpu:
            self.cpu.move_to_end(key)
        elif self.slot_key[slot] != key:
            self.cpu[key] = None
            while len(self.cpu) > self.cpu_capacity:
                evicted.append(self.cpu.popitem(last=False)[0])
        self.slot_key[slot] = key
        self.refs[slot] += 1
        self.last_use[slot] = self._clock
        return evicted

    def release(self, slot: int) -> None:
        if self.refs[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than acquired")
        self.refs[slot] -= 1

    def in_use(self) -> int:
        return sum(1 for r in self.refs if r)

    def holds(self, key: str) -> bool:
        return key in self.slot_key and self.refs[self.slot_key.index(key)] > 0

    def resident(self) -> set[str]:
        """Keys in a slot or in host memory: a request for them reads no disk."""
        return set(self.cpu) | {k for k in self.slot_key if k is not None}


class LoRAManager:
    """The slots of one rank's model, and the adapters in them and in host memory."""

    def __init__(self, model, limits: LoRALimits, device: torch.device, dtype: torch.dtype):
        self.limits, self.device, self.dtype = limits, device, dtype
        self.model_cfg = model.cfg
        self.layers: dict[tuple[int, str], LayerSlots] = {}  # (layer index, peft module) -> its fused layer's slots
        self._all: list[LayerSlots] = []
        for i, layer, subs in model.lora_targets():
            ls = LayerSlots(layer, subs, limits.max_loras, limits.max_rank, dtype, device)
            layer.lora = ls
            self._all.append(ls)
            for m, _ in subs:
                self.layers[(i, m)] = ls
        self.table = SlotTable(limits.max_loras, limits.max_cpu_loras)
        self.host: dict[str, dict] = {}  # adapter key -> {id(LayerSlots): parts} for the keys the table keeps
        self.loads = 0  # slot fills (a host-to-device copy)
        self.disk_reads = 0
        # Prefetch: adapters the scheduler will admit once read (disk, shard, dtype, pinning) on a
        # background thread, so no step waits for a disk read. Outside the table: the read it
        # saves is the one acquire() would do (the table, and the scheduler's mirror, say "read").
        self._pool = None
        self._reading: dict[str, Future] = {}  # key -> its read in flight or done
        self._announced: set[str] = set()  # keys whose read was reported done (staged_since)

    def prefetch(self, lora: LoRARequest) -> None:
        """Start reading `lora` into host memory (idempotent; nothing if it is resident)."""
        key = lora.key
        if key in self._reading or key in self.table.resident():
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-read")
        # Bounded: reads for requests that went away are dropped, oldest first (a request for
        # a dropped one still runs: acquire reads it in the step).
        done = [k for k, f in self._reading.items() if f.done()]
        while done and len(self._reading) >= max(1, self.limits.max_cpu_loras):
            old = done.pop(0)
            del self._reading[old]
            self._announced.discard(old)
        self._reading[key] = self._pool.submit(self._read, lora)

    def staged_since(self) -> list[str]:
        """Keys whose prefetch finished (read or failed: acquire re-raises) since the last call."""
        done = [k for k, f in self._reading.items() if f.done() and k not in self._announced]
        self._announced.update(done)
        return done

    def acquire(self, lora: LoRARequest) -> int:
        """The slot holding `lora` for one more live request (filled now if it is not in one)."""
        key = lora.key
        s, fill, read = self.table.plan(key)
        if fill:  # read (which may fail, naming the file) before the table changes
            if read:
                fut = self._reading.pop(key, None)
                self._announced.discard(key)
                parts = fut.result() if fut is not None else self._read(lora)
            else:
                parts = self.host[key]
            for ls in self._all:
                ls.write(s, parts.get(id(ls), []))
            self.loads += 1
        for k in self.table.commit(key, s):
            self.host.pop(k, None)
        if fill and key in self.table.cpu:
            self.host[key] = parts
        return s

    def release(self, slot: int) -> None:
        self.table.release(slot)

    def _read(self, lora: LoRARequest) -> dict:
        cfg, tensors = read_adapter(lora.lora_path, self.model_cfg)
        if cfg.rank > self.limits.max_rank:
            raise LoRAError(f"{cfg.path / CONFIG_FILE}: r: rank {cfg.rank} exceeds max_lora_rank "
                            f"({self.limits.max_rank})")
        parts: dict[int, list] = {}
        pin = self.device.type == "cuda"
        for (layer, module), (a, b) in tensors.items():
            ls = self.layers[(layer, module)]
            i, a_s, off, b_s = ls.shard(module, a, b, cfg.scaling, f"{cfg.path / WEIGHTS_FILE}: layer {layer}")
            a_s, b_s = a_s.to(self.dtype).contiguous(), b_s.to(self.dtype).contiguous()
            if pin:
                a_s, b_s = a_s.pin_memory(), b_s.pin_memory()
            parts.setdefault(id(ls), []).append((i, a_s, off, b_s))
        self.disk_reads += 1
        return parts

    def batch(self, token_slots: np.ndarray, staging=None) -> LoRABatch:
        return lora_batch(token_slots, self.limits.max_loras, self.device, staging)
