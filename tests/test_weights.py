"""Loading weights: a real transformers checkpoint through the lazy loader, names and shapes checked;
seeded random weights; clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.weights import CheckpointWeights, RandomWeights, WeightsError, open_weights
from helpers import tiny_spec


def test_checkpoint_layers_load_lazily_with_hf_names(tiny_checkpoint):
    spec = tiny_spec()
    weights = open_weights(str(tiny_checkpoint), spec)
    assert isinstance(weights, CheckpointWeights)
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    for i in range(spec.num_layers):
        layer = weights.layer(i)
        assert set(layer) == set(spec.layer_weight_shapes())
        for name, t in layer.items():
            assert torch.equal(t, state[f"model.layers.{i}.{name}"].float())
    assert torch.equal(weights.rows("model.embed_tokens.weight", 5, 9), state["model.embed_tokens.weight"][5:9])


def test_a_tensor_of_the_wrong_shape_is_rejected_when_the_checkpoint_opens(tiny_checkpoint, tmp_path):
    """Shapes are read from the files' headers when the checkpoint is opened, before any work."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"model.layers.1.mlp.up_proj.weight has shape \(3, 3\)"):
        open_weights(str(folder), tiny_spec())
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="lacks 1 tensors, e.g. model.norm.weight"):
        open_weights(str(folder), tiny_spec())


def test_random_weights_are_seeded_per_tensor_and_faithful():
    spec = tiny_spec()
    a, b = RandomWeights(spec, seed=3), RandomWeights(spec, seed=3)
    assert torch.equal(a.layer(1)["mlp.down_proj.weight"], b.layer(1)["mlp.down_proj.weight"])
    assert not torch.equal(a.layer(0)["mlp.down_proj.weight"], a.layer(1)["mlp.down_proj.weight"])
    assert not torch.equal(a.layer(0)["mlp.down_proj.weight"], RandomWeights(spec, 4).layer(0)["mlp.down_proj.weight"])
    layer = a.layer(0)
    assert torch.equal(layer["input_layernorm.weight"], torch.ones(spec.hidden_size))
    assert torch.equal(layer["self_attn.q_proj.bias"], torch.zeros(spec.hidden_size))
    assert abs(layer["mlp.up_proj.weight"].std().item() - 0.02) < 0.002
    full = a.tensor("model.embed_tokens.weight")
    assert torch.equal(a.rows("model.embed_tokens.weight", 100, 250), full[100:250])


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        open_weights(str(tmp_path), tiny_spec())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        open_weights(str(tmp_path), tiny_spec())


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_reads_the_text_model_under_its_prefix(family_checkpoint, tmp_path, prefix):
    """Gemma-3-4b is published as Gemma3ForConditionalGeneration: config.json nests the text config, and the
    text model's tensors sit under `language_model.model.` (the hub's layout; transformers 5 writes
    `model.language_model.`). The loader reads the same tensors as from a plain text checkpoint."""
    from exporter.registry import spec_from_hf_config

    text_folder = family_checkpoint("gemma3")
    text_config = json.loads((text_folder / "config.json").read_text())
    state = load_file(str(text_folder / "model.safetensors"))
    folder = tmp_path / "wrapped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_config,
                                                    "vision_config": {}, "tie_word_embeddings": True}))
    save_file({prefix + k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
              str(folder / "model.safetensors"))
    spec = spec_from_hf_config(json.loads((folder / "config.json").read_text()), "wrapped", None)
    assert spec.family == "gemma3" and spec.checkpoint_prefix == "language_model.model."
    weights = open_weights(str(folder), spec)
    plain = open_weights(str(text_folder), spec_from_hf_config(text_config, "plain", None))
    for i in range(spec.num_layers):
        for name, t in weights.layer(i).items():
            assert torch.equal(t, plain.layer(i)[name]), name
    assert torch.equal(weights.tensor("model.embed_tokens.weight"), plain.tensor("model.embed_tokens.weight"))
    assert torch.equal(weights.tensor("model.norm.weight"), plain.tensor("model.norm.weight"))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_random_norms_are_the_identity_in_each_family_style(family):
    """transformers initialises RMSNorm weights so that the norm scales by 1: w = 1, or w = 0 where the
    family uses (1 + w) (Gemma); q/k norms included."""
    from graphs.family import get_family
    from helpers import TINY_FAMILY_SPECS

    spec = TINY_FAMILY_SPECS[family]
    fam = get_family(family)
    weights = RandomWeights(spec, seed=1)
    layer = weights.layer(0)
    for name in fam.norms.values():
        assert torch.equal(layer[name] + fam.norm_offset, torch.ones_like(layer[name])), name
    assert torch.equal(weights.tensor("model.norm.weight") + fam.norm_offset, torch.ones(spec.hidden_size))
    assert layer["self_attn.q_proj.weight"].std() > 0.01
