"""The independent reference: `transformers` Qwen2ForCausalLM + `peft` LoRA + torch autograd.

Nothing here uses the project's own math (`graphs/`): the weights are the bundle's (or the manifest's
source, for backends that bake weights into their programs), the model and loss are Hugging Face's,
the LoRA wrapping is PEFT's, and the gradients are autograd's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from exporter import schedule as sched


def _bundle_state_dict(bundle: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """Hugging Face names -> tensors, read from the bundle's weight files (weights-as-inputs backends)."""
    arch = manifest["model"]["architecture"]
    state = {}
    for i in range(arch["num_layers"]):
        with safe_open(str(bundle / sched.layer_file(i)), framework="pt") as f:
            for name in f.keys():
                state[f"model.layers.{i}.{name}"] = f.get_tensor(name)
    with safe_open(str(bundle / sched.EMBEDDING_FILE), framework="pt") as f:
        state["model.embed_tokens.weight"] = f.get_slice("weight")[:arch["vocab_size"]]
    with safe_open(str(bundle / sched.FINAL_NORM_FILE), framework="pt") as f:
        state["model.norm.weight"] = f.get_tensor("weight")
    if not arch["tie_word_embeddings"]:
        with safe_open(str(bundle / sched.LM_HEAD_FILE), framework="pt") as f:
            state["lm_head.weight"] = f.get_slice("weight")[:arch["vocab_size"]]
    return state


def _source_state_dict(manifest: dict) -> dict[str, torch.Tensor]:
    """Hugging Face names -> tensors, from the weight source the bundle was built from."""
    from exporter.weights import EMBEDDING, FINAL_NORM, LM_HEAD, RandomWeights, open_weights
    from graphs.config import ModelSpec

    spec = ModelSpec(**manifest["model"]["architecture"])
    source = manifest["weights"]["source"]
    if source.startswith("random (seed "):
        weights = RandomWeights(spec, int(source[len("random (seed "):-1]))
    else:
        weights = open_weights(source.removeprefix("hf://"), spec)
    state = {EMBEDDING: weights.tensor(EMBEDDING), FINAL_NORM: weights.tensor(FINAL_NORM)}
    if not spec.tie_word_embeddings:
        state[LM_HEAD] = weights.tensor(LM_HEAD)
    for i in range(spec.num_layers):
        state.update({f"model.layers.{i}.{n}": t for n, t in weights.layer(i).items()})
    return state


def base_model(bundle: Path, manifest: dict):
    """The bundle's frozen model as a float32 `transformers` Qwen2ForCausalLM (eager attention)."""
    import transformers

    config = transformers.Qwen2Config(**{k: v for k, v in manifest["model"]["hf_config"].items()
                                         if k not in ("model_type", "architectures")})
    config._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
    state = (_source_state_dict(manifest) if manifest["weights"]["layers_in_graphs"]
             else _bundle_state_dict(bundle, manifest))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"reference weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def peft_model(model, manifest: dict, adapter_tensors: dict[str, np.ndarray]):
    """Wrap `model` with PEFT LoRA as the manifest configures it, loaded with PEFT-named tensors."""
    import peft

    from graphs.config import TARGET_MODULES

    lora = manifest["lora"]
    config = peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none",
                             target_modules=[TARGET_MODULES[t].split(".")[-1] for t in lora["targets"]])
    wrapped = peft.get_peft_model(model, config)
    result = peft.set_peft_model_state_dict(wrapped, {k: torch.as_tensor(np.asarray(v)) for k, v in adapter_tensors.items()})
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter tensors not in the model: {result.unexpected_keys[:3]}")
    return wrapped


def loss_and_grads(wrapped, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Causal-LM loss and the gradient of every LoRA tensor, by PEFT's saved names."""
    wrapped.zero_grad(set_to_none=True)
    out = wrapped(input_ids=torch.as_tensor(input_ids, dtype=torch.long), labels=torch.as_tensor(labels, dtype=torch.long))
    out.loss.backward()
    grads = {}
    for name, p in wrapped.named_parameters():
        if "lora_" in name and p.grad is not None:
            grads[name.replace(".default", "")] = p.grad.detach().numpy().copy()
    return float(out.loss.detach()), grads


def loss_only(wrapped, input_ids: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        out = wrapped(input_ids=torch.as_tensor(input_ids, dtype=torch.long), labels=torch.as_tensor(labels, dtype=torch.long))
    return float(out.loss)
