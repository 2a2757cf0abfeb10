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
