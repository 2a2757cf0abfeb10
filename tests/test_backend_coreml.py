"""Core ML: packages convert on Linux; their functions, signatures and shared weights are checked here;
predictions are compared with eager PyTorch on macOS only (Core ML prediction needs macOS)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from exporter import graph_defs as gd  # noqa: E402
from exporter.backends.base import RuntimeUnavailable  # noqa: E402
from exporter.backends.coreml import BACKEND, describe_package  # noqa: E402
from graphs.config import LoraConfig  # noqa: E402
from helpers import random_layer_weights, random_lora, tiny_spec  # noqa: E402

SPEC, LORA = tiny_spec(), LoraConfig(rank=4, seq_len=16)


@pytest.fixture(scope="module", params=gd.METHODS)
def layer_package(request, tmp_path_factory):
    shapes = gd.StepShapes(SPEC, LORA, method=request.param, vocab_chunk_rows=128)
    weights = {k: v.float() for k, v in random_layer_weights(SPEC).items()}
    defs = [gd.layer_forward_graph(shapes, weights), gd.layer_backward_graph(shapes, weights)]
    out = tmp_path_factory.mktemp(f"coreml-{request.param}")
    return out, defs, BACKEND.lower("layer_00", defs, out), weights


def test_layer_package_has_both_functions_with_the_manifest_signatures(layer_package):
    out, defs, lowered, _ = layer_package
    assert [g.id for g in lowered] == ["layer_00.layer_forward", "layer_00.layer_backward"]
    assert {g.file for g in lowered} == {"graphs/layer_00.mlpackage"}
    described = describe_package(out / "graphs/layer_00.mlpackage")
    assert set(described["functions"]) == {"layer_forward", "layer_backward"}
    for g, d in zip(lowered, defs):
        fn = described["functions"][g.method]
        assert fn["inputs"] == g.inputs  # names, shapes, dtypes; no frozen weight among the inputs
        assert not any(t["name"].endswith("_weight") for t in fn["inputs"])
        assert [o["name"] for o in fn["outputs"]] == [t.name for t in d.outputs]


def test_frozen_weights_are_stored_once(layer_package):
    out, _, _, weights = layer_package
    constants = sum(t.numel() * t.element_size() for t in weights.values())
    stored = describe_package(out / "graphs/layer_00.mlpackage")["weight_bin_bytes"]
    assert constants <= stored <= 1.15 * constants, (stored, constants)


def test_token_inputs_are_int32(tmp_path):
    shapes = gd.StepShapes(SPEC, LORA, vocab_chunk_rows=128)
    lowered = BACKEND.lower("head", [gd.head_chunk_graph(shapes), gd.head_finish_graph(shapes)], tmp_path)
    described = describe_package(tmp_path / "graphs/head.mlpackage")["functions"]
    for g in lowered:
        dtypes = {t["name"]: t["dtype"] for t in described[g.method]["inputs"]}
        assert dtypes["labels"] == "int32" and dtypes["x"] == "float32"
        assert dtypes == {t["name"]: t["dtype"] for t in g.inputs}


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_load_says_core_ml_needs_macos(layer_package):
    out, _, lowered, _ = layer_package
    with pytest.raises(RuntimeUnavailable, match="needs macOS"):
        BACKEND.load(out, lowered[0].to_dict())


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_predictions_match_eager_on_macos(layer_package):
    out, defs, lowered, _ = layer_package
    lora = [v.float() for v in random_lora(SPEC, LORA).values()]
    x = torch.randn(1, LORA.seq_len, SPEC.hidden_size)
    for g, d, inputs in zip(lowered, defs, ([x, *lora], [x, torch.randn_like(x), *lora])):
        got = BACKEND.load(out, g.to_dict())([t.numpy() for t in inputs])
        with torch.no_grad():
            want = d.module(*inputs)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)


def test_bundle_builds_and_verifies_what_it_can_off_macos(tiny_checkpoint, tmp_path, capsys):
    import json

    from exporter.build import Reporter, build
    from exporter.cache import ArtifactCache
    from exporter.config import BuildConfig
    from runtime_harness.cli import main as harness_main

    bundle = tmp_path / "bundle"
    build(BuildConfig(model=str(tiny_checkpoint), backend="coreml", out=bundle, lora=LORA, vocab_chunk_rows=128),
          Reporter(progress=False), ArtifactCache.disabled())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["weights"]["layers_in_graphs"] and not (bundle / "weights" / "layer_00.safetensors").exists()
    assert {g["file"] for g in manifest["graphs"].values()} == {
        "graphs/embed.mlpackage", "graphs/head.mlpackage", "graphs/optimizer.mlpackage",
        "graphs/layer_00.mlpackage", "graphs/layer_01.mlpackage"}
    if sys.platform == "darwin":
        assert harness_main(["verify", str(bundle), "--report", str(tmp_path / "r.json")]) == 0
        return
    assert harness_main(["verify", str(bundle), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "Core ML prediction needs macOS" in out and "PASS (structure)" in out
    # an altered package is caught by its checksum
    weights = bundle / "graphs/layer_01.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    assert harness_main(["verify", str(bundle), "--report", str(tmp_path / "r.json")]) == 2
