"""The ONNX Runtime training-API path end to end, as an app team drives it from the README and the
`training/` files: the bundle's `train_step_ort_api` schedule (every layer's gradients kept, then one
`ort_training_step` through onnxruntime.training.api CheckpointState / Module / Optimizer) updates the
LoRA parameters exactly as the bundle's own per-layer optimizer graphs (`train_step`) do."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training", reason="the ORT training API needs onnxruntime-training")

from exporter.build import Reporter, build  # noqa: E402
from exporter.cache import ArtifactCache  # noqa: E402
from exporter.config import BuildConfig  # noqa: E402
from exporter.schedule import grad_of  # noqa: E402
from graphs.config import LoraConfig  # noqa: E402
from runtime_harness.runner import BundleRunner  # noqa: E402
from runtime_harness.verify import nonzero_adapter, seeded_batch  # noqa: E402


@pytest.fixture(scope="module", params=["sgd", "adamw"])
def ort_bundle(request, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ort-api") / f"tiny-ort-{request.param}"
    build(BuildConfig(model=str(tiny_checkpoint), backend="ort", out=out, optimizer=request.param,
                      lora=LoraConfig(rank=4, seq_len=16), vocab_chunk_rows=128), Reporter(progress=False),
          ArtifactCache(tmp_path_factory.getbasetemp() / "artifact-cache"))
    return out


def test_names_and_order_agree(ort_bundle):
    from onnxruntime.training.api import CheckpointState, Module

    manifest = json.loads((ort_bundle / "manifest.json").read_text())
    info = manifest["ort_training"]
    state = CheckpointState.load_checkpoint(str(ort_bundle / info["checkpoint"]))
    listed = [n for n, _ in state.parameters]
    assert info["parameters"] == listed  # the checkpoint's own order
    assert sorted(listed) == sorted(t["name"] for t in manifest["state"] if "adapter" in t["init"])
    inputs = Module(str(ort_bundle / info["training_model"]), state, device="cpu").input_names()
    assert inputs == info["gradient_inputs"] == [grad_of(p) for p in listed]
    produced = {v if isinstance(v, str) else v["tensor"]  # (a slice target writes rows of a filled tensor)
                for e in manifest["schedules"]["train_step"] if e["op"] == "call" for v in e["outputs"].values()}
    assert set(inputs) <= produced  # the training model's inputs are the names the schedule writes
    step = manifest["schedules"]["train_step_ort_api"][-1]
    assert step["op"] == "ort_training_step" and step["gradients"] == inputs and step["parameters"] == listed


def test_ort_api_step_equals_the_optimizer_graphs(ort_bundle):
    """Same gradients in, same parameters out: the ORT-API step vs the train_step schedule's own
    per-layer optimizer calls, over two steps (AdamW's bias correction depends on the step)."""
    manifest = json.loads((ort_bundle / "manifest.json").read_text())
    adapter = nonzero_adapter(manifest, 2)
    ids, labels = seeded_batch(manifest, 2)
    api, graphs = BundleRunner(ort_bundle), BundleRunner(ort_bundle)
    graphs.manifest["schedules"]["optimizer_calls"] = [
        {**e, "free": [n for n in e["free"] if n != "dy"]} for e in manifest["schedules"]["train_step"]
        if e["op"] == "call" and e["graph"] == "optimizer.optimizer"]
    theirs, ours = api.initial_state(adapter), graphs.initial_state(adapter)
    lr = 3e-2
    reference_loss, _ = graphs.step(graphs.initial_state(adapter), ids, labels, lr)
    for step in range(2):
        loss, _ = api.step(theirs, ids, labels, lr, schedule="train_step_ort_api",
                           keep=lambda n: n.startswith("grad."))
        if step == 0:
            assert loss == pytest.approx(reference_loss, rel=1e-6)
        grads = {k: theirs.pop(k) for k in [k for k in theirs if k.startswith("grad.")]}
        assert len(grads) == len(manifest["ort_training"]["parameters"])
        ours.update(grads, lr=np.asarray([lr], np.float32))
        graphs.run("optimizer_calls", ours)
        ours.pop("lr")
        for name in manifest["ort_training"]["parameters"]:
            if manifest["optimizer"]["name"] == "sgd":
                np.testing.assert_array_equal(theirs[name], ours[name], err_msg=name)
            else:  # float32 bias corrections, rounded differently by ORT's kernel and our graph
                np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-6, atol=5e-5 * lr, err_msg=name)
            assert not np.array_equal(theirs[name], adapter[next(t["init"]["adapter"] for t in manifest["state"]
                                                                   if t["name"] == name)])
        assert not any(k.startswith("grad.") for k in ours)  # the optimizer calls freed them


def test_adamw_lr_zero_keeps_parameters_but_advances_the_state(ort_bundle):
    """Documented: lr 0 is not a no-op for AdamW. Parameters stay; moments and the step count advance."""
    manifest = json.loads((ort_bundle / "manifest.json").read_text())
    if manifest["optimizer"]["name"] != "adamw":
        pytest.skip("SGD has no optimizer state")
    adapter = nonzero_adapter(manifest, 0)
    ids, labels = seeded_batch(manifest, 0)
    runner = BundleRunner(ort_bundle)
    store = runner.initial_state(adapter)
    runner.step(store, ids, labels, 0.0)
    for t in manifest["state"]:
        if "adapter" in t["init"]:
            np.testing.assert_array_equal(store[t["name"]], adapter[t["init"]["adapter"]])
    assert np.asarray(store["optim.0.step"])[0] == 1.0
    assert np.abs(store["optim.0.exp_avg.self_attn.q_proj.lora_A"]).max() > 0
