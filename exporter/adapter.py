"""The initial LoRA adapter, in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`).

Initialisation follows PEFT's default: A ~ kaiming_uniform(a=sqrt(5)), B = 0 (so the adapted model
starts equal to the base model), seeded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exporter.bundle_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_tensor_name
from graphs.config import LoraConfig, ModelSpec, TARGET_MODULES


def init_lora(spec: ModelSpec, lora: LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named initial tensors for every layer."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(spec.num_layers):
        for name, shape in lora.layer_lora_shapes(spec).items():
            t = torch.empty(shape)
            if name.endswith("lora_A"):
                # kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)
                bound = 1.0 / math.sqrt(shape[1])
                t = torch.rand(shape, generator=gen) * 2 * bound - bound
            else:
                t.zero_()
            tensors[peft_tensor_name(i, name)] = t.contiguous()
    return tensors


def peft_config(spec: ModelSpec, lora: LoraConfig, base_model: str | None) -> dict:
    """adapter_config.json contents, made by peft itself."""
    import peft

    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=sorted(TARGET_MODULES[t].split(".")[-1] for t in lora.targets),
        base_model_name_or_path=base_model,
    )
    d = config.to_dict()
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    return config, load_file(str(folder / ADAPTER_WEIGHTS))
