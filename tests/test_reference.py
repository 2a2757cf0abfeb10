"""The float64 layer-by-layer reference (runtime_harness/reference.py) against the whole-model
transformers + PEFT result, on tiny checkpoints saved by transformers itself (tied and untied heads)."""
from __future__ import annotations

import dataclasses
import gc
import json
import weakref

import numpy as np
import pytest
import torch

from exporter.weights import open_weights
from graphs.config import LoraConfig
from helpers import TINY_FAMILY_SPECS, make_hf_checkpoint
from runtime_harness import reference as R
from runtime_harness.verify import nonzero_adapter, seeded_batch

LORA = LoraConfig(rank=4, seq_len=16, targets=("q", "k", "v", "o", "gate", "up", "down"))


def _manifest(spec, folder) -> dict:
    """The manifest fields the reference reads."""
    state = [{"name": f"lora.{i}.{n}", "shape": list(s), "dtype": "float32",
              "init": {"adapter": f"base_model.model.model.layers.{i}.{n}.weight"}}
             for i in range(spec.num_layers) for n, s in LORA.layer_lora_shapes(spec).items()]
    return {"model": {"architecture": spec.to_dict(), "hf_config": json.loads((folder / "config.json").read_text())},
            "lora": LORA.to_dict() | {"scale": LORA.scale}, "weights": {"source": str(folder), "sha256": None},
            "state": state, "batch": 2, "seq_len": 16}


# every family (tied, as their small models are), and Qwen2 untied as well
CASES = [(family, True) for family in TINY_FAMILY_SPECS] + [("qwen2", False)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def case(request, tmp_path_factory):
    family, tied = request.param
    spec = dataclasses.replace(TINY_FAMILY_SPECS[family], tie_word_embeddings=tied)
    folder = tmp_path_factory.mktemp("ckpt")
    make_hf_checkpoint(spec, folder, seed=2)
    manifest = _manifest(spec, folder)
    weights = open_weights(str(folder), spec)
    adapter = nonzero_adapter(manifest, 5)
    ids, labels = seeded_batch(manifest, 5)
    return manifest, weights, adapter, ids, labels


def test_layerwise_equals_whole_model_transformers_peft(case, monkeypatch):
    manifest, weights, adapter, ids, labels = case
    monkeypatch.setattr(R, "ROW_BLOCK", 96)  # several vocabulary blocks, the last one partial (320 rows)
    loss, grads = R.layerwise_loss_and_grads(manifest, weights, adapter, ids, labels)
    model = R.peft_model(R.whole_model(manifest, weights, torch.float64), manifest, adapter)
    ref_loss, ref = R.whole_model_loss_and_grads(model, ids, labels)
    assert set(grads) == set(ref) and len(ref) == weights.spec.num_layers * 14
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    for name in ref:
        assert grads[name].dtype == np.float64
        np.testing.assert_allclose(grads[name], ref[name], rtol=0, atol=1e-12 * np.abs(ref[name]).max(), err_msg=name)


def test_reference_loss_is_float64_end_to_end(case):
    """transformers' own loss casts the logits to float32; ours is the float64 cross-entropy."""
    manifest, weights, adapter, ids, labels = case
    loss, _ = R.layerwise_loss_and_grads(manifest, weights, adapter, ids, labels)
    model = R.peft_model(R.whole_model(manifest, weights, torch.float64), manifest, adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)).logits
    assert logits.dtype == torch.float64
    lp = torch.log_softmax(logits[:, :-1], -1)
    target = torch.as_tensor(labels)[:, 1:]
    keep = target != -100
    exact = float(-lp[keep].gather(-1, target[keep][:, None]).mean())
    assert abs(loss - exact) <= 1e-13 * abs(exact)


def test_one_decoder_layer_at_a_time(case, monkeypatch):
    manifest, weights, adapter, ids, labels = case
    alive: weakref.WeakSet = weakref.WeakSet()
    most = []
    original = R.Architecture.layer

    def tracked(self, index, w):
        gc.collect()
        most.append(len(alive))
        layer = original(self, index, w)
        alive.add(layer)
        return layer

    monkeypatch.setattr(R.Architecture, "layer", tracked)
    R.layerwise_loss_and_grads(manifest, weights, adapter, ids, labels)
    assert len(most) == 2 * weights.spec.num_layers and max(most) == 0  # forward and backward build each layer; none outlives its use
