"""LoRA adapters as models: the names clients ask for, and the adapters behind them.

A request's `model` is the served model's name (the base model), an adapter's
name (configured with `--lora-modules name=path,...` or loaded at run time), or
`base:adapter`. Each adapter gets an id here, once, so the LoRARequest the
replicas see (and the prefix-cache key derived from it) is the same on every
replica. Adapters are checked when they are named (adapter_config.json read:
rank, modules), so a bad one is refused then, not at the first request.

Runtime loading is vLLM's shape (admin.py serves it):
    POST /v1/load_lora_adapter    {"lora_name": "...", "lora_path": "/dir"}
    POST /v1/unload_lora_adapter  {"lora_name": "..."}
With several ingresses (--ingresses N) each keeps its own table: a runtime load
reaches the ingress that took the call; `--lora-modules` reach them all.
"""

from __future__ import annotations

import itertools
import time

from ziggurat.actors.ingress.protocol import APIError, bad
from ziggurat.models.lora import LoRAError, check_adapter, read_adapter_config
from ziggurat.sampling_params import LoRARequest


def parse_lora_modules(spec: str | None) -> list[tuple[str, str]]:
    """`name=path[,name=path ...]` (commas or spaces between) -> [(name, path)]; ValueError naming the item."""
    out = []
    for item in (spec or "").replace(",", " ").split():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"lora_modules: expected name=path, got {item!r}")
        out.append((name, path))
    return out


def _not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")


class AdapterTable:
    def __init__(self, base: str | None, max_lora_rank: int, modules: list[tuple[str, str]] = (), model_config=None):
        """max_lora_rank: the replicas' (0: they serve no adapters); model_config: the base model's
        ModelConfig, which adapters' tensor shapes must fit."""
        self.base, self.max_rank, self.model_config = base, max_lora_rank, model_config
        self.adapters: dict[str, LoRARequest] = {}
        self.created: dict[str, int] = {}
        self._ids = itertools.count(1)
        for name, path in modules:
            try:
                self.load(name, path)
            except APIError as e:
                raise ValueError(f"lora_modules: {e.message}") from None

    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); a 404 naming `model` if none."""
        if model is None or model == self.base:
            return None
        lora = self.adapters.get(model)
        if lora is None and self.base is not None and model.startswith(self.base + ":"):
            lora = self.adapters.get(model[len(self.base) + 1 :])
        if lora is None:
            raise _not_found(model)
        return lora

    def load(self, name, path) -> LoRARequest:
        if not isinstance(name, str) or not name:
            raise bad("lora_name: a non-empty string is required", "lora_name")
        if not isinstance(path, str) or not path:
            raise bad("lora_path: a non-empty string is required", "lora_path")
        if not self.max_rank:
            raise bad("LoRA adapters are not enabled on this deployment (serve with --enable-lora)", "lora_name")
        if name == self.base or name in self.adapters:
            raise bad(f"lora_name: the adapter '{name}' has already been loaded" if name in self.adapters else
                      f"lora_name: '{name}' is the base model's name", "lora_name")
        try:
            cfg = check_adapter(path, self.model_config) if self.model_config is not None else \
                read_adapter_config(path)
        except LoRAError as e:
            raise bad(f"lora_path: {e}", "lora_path") from None
        if cfg.rank > self.max_rank:
            raise bad(f"lora_path: {path}: adapter rank {cfg.rank} exceeds max_lora_rank ({self.max_rank})",
                      "lora_path")
        lora = self.adapters[name] = LoRARequest(name, next(self._ids), str(cfg.path), cfg.rank)
        self.created[name] = int(time.time())
        return lora

    def unload(self, name) -> None:
        if not isinstance(name, str) or name not in self.adapters:
            raise APIError(404, f"The LoRA adapter '{name}' is not loaded", "invalid_request_error", "lora_name",
                           "not_found")
        del self.adapters[name]
        del self.created[name]

    def cards(self, max_model_len: int) -> list[dict]:
        """/v1/models entries of the adapters (vLLM's shape: `parent` is the base model)."""
        return [{"id": name, "object": "model", "created": self.created[name], "owned_by": "ziggurat",
                 "root": lora.lora_path, "parent": self.base, "max_model_len": max_model_len}
                for name, lora in self.adapters.items()]
