"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from ziggurat.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError
from ziggurat.models.llama import LlamaForCausalLM

_MODELS = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig):
    try:
        return _MODELS[cfg.architecture]
    except KeyError:
        raise ModelConfigError(f"unsupported architecture {cfg.architecture!r}") from None
