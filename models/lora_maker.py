"""Random-weight LoRA adapters in PEFT's format, for tests and benchmarks (as maker.py makes models).

    python -m ziggurat.models.lora_maker MODEL_DIR OUT --rank 16 [--seed 0] [--targets q_proj,v_proj]

writes OUT/adapter_config.json and OUT/adapter_model.safetensors with the tensor
names `peft` saves (base_model.model.model.layers.N.{self_attn,mlp}.M.lora_{A,B}.weight),
both A and B random (a freshly initialised PEFT adapter has B = 0, which would
test nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ziggurat.models.config import ModelConfig
from ziggurat.models.lora import CONFIG_FILE, MODULES, WEIGHTS_FILE, module_shapes

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapter(model_dir: str | Path, out: str | Path, rank: int = 8, seed: int = 0, alpha: float | None = None,
                 targets: tuple[str, ...] = MODULES, use_rslora: bool = False, scale: float = 0.05,
                 dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    cfg = ModelConfig.from_dir(model_dir)
    shapes = module_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            o, i = shapes[m]
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if m in _ATTN else 'mlp'}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, i, generator=g) * scale).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * scale).to(dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank, "lora_dropout": 0.0, "target_modules": list(targets),
        "use_rslora": use_rslora, "fan_in_fan_out": False, "bias": "none", "use_dora": False,
        "modules_to_save": None}, indent=2))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=",".join(MODULES))
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args(argv)
    make_adapter(a.model_dir, a.out, a.rank, a.seed, targets=tuple(a.targets.split(",")), dtype=getattr(torch, a.dtype))
    print(a.out)


if __name__ == "__main__":
    main()
