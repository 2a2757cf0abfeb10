"""Helpers shared by the tests: the tiny architecture, random tensors, and real HF checkpoints.

Everything here is deterministic given `torch.manual_seed` (the autouse `seed` fixture pins it to 0).
Layer tensors use the names of `ModelSpec.layer_weight_shapes` / `LoraConfig.layer_lora_shapes`
(Hugging Face names relative to the layer, e.g. `self_attn.q_proj.weight`, `mlp.up_proj.lora_A`).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from graphs.config import LoraConfig, ModelSpec


def tiny_spec(**overrides) -> ModelSpec:
    """2 layers, 4 heads over 2 kv heads (GQA), tied embeddings, vocab 320 (>= 256 for byte-level text)."""
    fields = dict(name="tiny-qwen2", hf_repo=None, vocab_size=320, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6)
    fields.update(overrides)
    return ModelSpec(**fields)


def random_layer_weights(spec: ModelSpec, dtype=torch.float64, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Frozen tensors of one layer; norms around 1 so that RMSNorm's weight matters."""
    out = {}
    for name, shape in spec.layer_weight_shapes().items():
        t = torch.randn(shape, dtype=dtype) * scale
        out[name] = 1.0 + t if name.endswith("layernorm.weight") else t
    return out


def random_lora(spec: ModelSpec, lora: LoraConfig, dtype=torch.float64, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """NONZERO LoRA A and B (B = 0, PEFT's default, would hide every bug in dA)."""
    return {n: torch.randn(s, dtype=dtype) * scale for n, s in lora.layer_lora_shapes(spec).items()}


def make_hf_checkpoint(spec: ModelSpec, folder: Path, seed: int = 0):
    """A real `transformers.Qwen2ForCausalLM` of `spec` (float32, eager attention), saved to `folder` with
    `save_pretrained` (safetensors); returns the model, in eval mode.

    Biases and norm weights are perturbed away from their zero / one initialization, so that a test
    which loads them wrongly (or forgets them) fails.
    """
    import transformers

    torch.manual_seed(seed)
    fields = {k: v for k, v in spec.to_hf_config().items() if k not in ("model_type", "architectures")}
    config = transformers.Qwen2Config(**fields, dtype="float32", attn_implementation="eager")
    config._attn_implementation = "eager"  # older transformers ignore the constructor argument
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


_RUNTIME_MODULES = {"executorch": "executorch.runtime", "ort": "onnxruntime", "coreml": "coremltools"}


def runnable_backends() -> list:
    """Every backend in the registry as a pytest param; one whose runtime cannot run graphs here is
    skipped with the reason (Core ML off macOS is covered structurally by test_backend_coreml.py)."""
    import importlib.util
    import sys

    import pytest

    from exporter.backends import BACKEND_NAMES

    params = []
    for name in BACKEND_NAMES:
        module = _RUNTIME_MODULES.get(name, name)
        if name == "coreml" and sys.platform != "darwin":
            reason = "Core ML prediction needs macOS (its structure is checked in test_backend_coreml.py)"
        elif importlib.util.find_spec(module.split(".")[0]) is None:
            reason = f"the {name} runtime ({module}) is not installed"
        else:
            reason = None
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return params


@contextmanager
def torch_threads(n: int):
    """Run the block with `torch.set_num_threads(n)`, then restore the previous count.

    Tiny-tensor tests are dominated by OpenMP synchronisation; one thread makes them many times faster
    (and their timing independent of whatever else runs on the machine's cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
