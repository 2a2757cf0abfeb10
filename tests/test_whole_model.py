"""A whole tiny model of each family composed only from graphs/ functions, layer by layer with only layer
inputs saved, against the independent reference: the family's transformers class (Qwen2ForCausalLM,
Qwen3ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM; eager attention) + peft LoRA + autograd (float32).

The tiny specs (tests/helpers.TINY_FAMILY_SPECS) have nonzero norms and biases, heads x head_dim !=
hidden, a sliding window (5) shorter than the sequence (16), a query scalar different from head_dim,
and llama3 / linear RoPE scaling."""
from __future__ import annotations

import random

import peft
import pytest
import torch

from graphs import head, layer
from graphs.config import ALL_TARGETS, TARGET_MODULES, LoraConfig
from graphs.family import get_family
from helpers import TINY_FAMILY_SPECS, make_hf_checkpoint, torch_threads

# A random (seeded, so reproducible) subset of three targets for the rank-4 case: ("o", "up", "down").
SUBSET = LoraConfig(rank=4, alpha=4, targets=tuple(random.Random(0).sample(ALL_TARGETS, 3)), seq_len=16)
CONFIGS = {
    "rank8-all": LoraConfig(rank=8, alpha=16, targets=ALL_TARGETS, seq_len=16),
    "rank4-" + "-".join(SUBSET.targets): SUBSET,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster than two and keeps the file's time stable."""
    with torch_threads(1):
        yield


def _peft_model(model, lora_cfg: LoraConfig):
    config = peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=0.0,
                             target_modules=[TARGET_MODULES[t].split(".")[-1] for t in lora_cfg.targets])
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():  # nonzero A and B: PEFT's B = 0 would make every A gradient zero
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    return wrapped


def _graphs_step(spec, lora_cfg, state, lora_of_layer, ids, labels):
    """Loss and LoRA gradients with graphs/ only: embed -> layers (keep inputs) -> head -> layers backward.

    Each layer runs as its own attention kind (spec.layer_types[i]) with the structured (MeSP) forward
    and backward, as the exported mesp graphs do."""
    fam = get_family(spec.family)
    E = state["model.embed_tokens.weight"]
    x = head.embed(ids, E, max_rows=100)
    if fam.scale_embedding:
        x = head.scale_embedding(x, spec.hidden_size)
    inputs = []
    for i in range(spec.num_layers):
        inputs.append(x)
        W = {n: state[f"model.layers.{i}.{n}"] for n in spec.layer_weight_shapes()}
        x = layer.decoder_layer_forward_structured(x, W, lora_of_layer(i), spec, lora_cfg.scale, mlp_blocks=3,
                                                   attention=spec.layer_types[i])
    loss, dy = head.lm_head_loss(x, state["model.norm.weight"], E, labels, spec.rms_norm_eps, max_rows=100,
                                 norm_offset=fam.norm_offset)
    grads = {}
    for i in reversed(range(spec.num_layers)):
        W = {n: state[f"model.layers.{i}.{n}"] for n in spec.layer_weight_shapes()}
        dy, g = layer.decoder_layer_backward(inputs[i], dy, W, lora_of_layer(i), spec, lora_cfg.scale, mlp_blocks=3,
                                             attention=spec.layer_types[i])
        grads.update({(i, n): t for n, t in g.items()})
        inputs[i] = None  # the only saved activation of layer i is released after its backward
    return loss, grads


@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
@pytest.mark.parametrize("lora_cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_whole_model_matches_transformers_peft(tmp_path, lora_cfg, family):
    spec = TINY_FAMILY_SPECS[family]
    base = make_hf_checkpoint(spec, tmp_path, seed=1, init_std=0.15)  # attention far from uniform: RoPE matters
    assert type(base).__name__ == get_family(family).hf_architecture
    model = _peft_model(base, lora_cfg)
    ids = torch.randint(0, spec.vocab_size, (1, 16))
    labels = ids.clone()
    labels[0, [0, 5, 9]] = -100
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    params = dict(model.named_parameters())
    state = {k: v.detach() for k, v in base.state_dict().items() if "lora_" not in k}
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items()}
    assert set(spec.layer_weight_shapes()) == {k.split(".", 3)[3] for k in state if k.startswith("model.layers.0.")}

    def lora_of_layer(i):
        out = {}
        for t in lora_cfg.targets:
            prefix = f"base_model.model.model.layers.{i}.{TARGET_MODULES[t]}"
            out[f"{TARGET_MODULES[t]}.lora_A"] = params[f"{prefix}.lora_A.default.weight"].detach()
            out[f"{TARGET_MODULES[t]}.lora_B"] = params[f"{prefix}.lora_B.default.weight"].detach()
        return out

    loss, grads = _graphs_step(spec, lora_cfg, state, lora_of_layer, ids, labels)
    assert abs(loss.item() - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    assert len(grads) == spec.num_layers * 2 * len(lora_cfg.targets)
    for (i, name), g in grads.items():
        module, ab = name.rsplit(".", 1)
        ref = params[f"base_model.model.model.layers.{i}.{module}.{ab}.default.weight"].grad
        rel = ((g - ref).abs().max() / ref.abs().max()).item()
        cos = torch.nn.functional.cosine_similarity(g.flatten().double(), ref.flatten().double(), dim=0).item()
        assert rel <= 1e-4 and cos >= 0.99999, (i, name, rel, cos)
