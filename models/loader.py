"""Reading HF-format safetensors checkpoints, single-file or sharded.

Files are memory-mapped (safe_open); a parameter's weight_loader asks its
TensorSource for just the rows or columns its TP rank owns, so a rank never
materialises a whole tensor it only holds a slice of.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ziggurat.models.quantization import check_source, finish_loading


class ModelLoadError(ValueError):
    pass


class TensorSource:
    """A lazily read checkpoint tensor; `read` narrows before reading."""

    def __init__(self, name: str, file: Path, handle):
        self.name, self.file, self._handle = name, file, handle
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = self._slice.get_dtype()  # safetensors' name: BF16, F8_E4M3, ...

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        try:
            if dim is None:
                return self._handle.get_tensor(self.name)
            index = [slice(None)] * len(self.shape)
            index[dim] = slice(start, start + (length if length is not None else self.shape[dim] - start))
            return self._slice[tuple(index)]
        except Exception as e:  # a truncated file surfaces here
            raise ModelLoadError(f"{self.file}: cannot read tensor '{self.name}': {e}") from None

    def expect_shape(self, expected: tuple[int, ...]) -> None:
        if self.shape != tuple(expected):
            raise ModelLoadError(
                f"{self.file}: tensor '{self.name}' has shape {list(self.shape)}, expected {list(expected)}"
            )


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: missing (listed in {index.name})")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json found")
    return found


def iter_tensors(model_dir: Path) -> Iterator[TensorSource]:
    from ziggurat.models import gguf

    try:
        gguf_file = gguf.find_gguf(model_dir)
        if gguf_file:
            yield from gguf.iter_tensors(gguf_file)
            return
    except gguf.GGUFError as e:
        raise ModelLoadError(str(e)) from None
    for f in checkpoint_files(model_dir):
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise ModelLoadError(f"{f}: not a readable safetensors file ({e})") from None
        with handle:
            names = list(handle.keys())
            for name in names:
                yield TensorSource(name, f, handle)


def load_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Fill every parameter of `model` from the checkpoint, or fail naming what is wrong.

    The model declares how checkpoint names map onto its (possibly merged)
    parameters via `model.checkpoint_mapping(name) -> (param_name, shard_id)`
    and which checkpoint tensors it deliberately skips.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for src in iter_tensors(model_dir):
        target = model.checkpoint_mapping(src.name)
        if target is None:
            continue
        pname, shard_id = target
        if pname not in params:
            raise ModelLoadError(f"{src.file}: unexpected tensor '{src.name}' (no such parameter in {type(model).__name__})")
        p = params[pname]
        check_source(p, src, pname)
        with torch.no_grad():
            p.weight_loader(p, src, shard_id)
        loaded.add(f"{pname}/{shard_id}")
    missing = []
    for pname, p in params.items():
        for shard in getattr(p, "shard_ids", (None,)):
            if f"{pname}/{shard}" not in loaded:
                missing.append(pname if shard is None else f"{pname}[{shard}]")
    if missing:
        raise ModelLoadError(
            f"{model_dir}: checkpoint is missing {len(missing)} tensor(s), e.g. " + ", ".join(missing[:5])
        )
    with torch.no_grad():
        finish_loading(model, getattr(getattr(model, "cfg", None), "quantization", None))
