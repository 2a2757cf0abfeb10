"""Every family's tiny checkpoint (tests/helpers.TINY_FAMILY_SPECS: nonzero norms and biases, heads x
head_dim != hidden, a sliding window shorter than the sequence, a query scalar other than head_dim,
llama3 / linear RoPE scaling) built for every backend and verified: the bundle's loss and every LoRA
gradient against transformers + PEFT (the float64 layer-by-layer reference, which test_reference.py
checks against the whole-model transformers + PEFT result for each family)."""
from __future__ import annotations

import json

import pytest

from helpers import TINY_FAMILY_SPECS, runnable_backends
from runtime_harness.verify import format_report, verify


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
def test_family_bundle_verifies(family, backend, tiny_bundles):
    bundle = tiny_bundles(family, backend)
    report = verify(bundle, seed=0)
    spec = TINY_FAMILY_SPECS[family]
    assert len(report["tensors"]) == spec.num_layers * 14
    assert report["ok"], format_report(report, 5)


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
def test_each_layer_runs_the_program_of_its_attention_kind(family, backend, tiny_bundles):
    """Graph entries say what they are (program, role, kind, layer, attention); no name is parsed. A layer
    call runs a graph of that layer's attention kind, and a baked program only for its own layer."""
    manifest = json.loads((tiny_bundles(family, backend) / "manifest.json").read_text())
    spec = TINY_FAMILY_SPECS[family]
    graphs = manifest["graphs"]
    layer_calls = [e for e in manifest["schedules"]["train_step"]
                   if e["op"] == "call" and graphs[e["graph"]]["role"] == "layer"]
    whole = ("layer_forward", "layer_backward")
    split = ("attn_forward", "mlp_block_forward", "mlp_finish", "mlp_out_backward", "mlp_block_backward",
             "mlp_backward_finish", "attn_backward")
    kinds = [graphs[e["graph"]]["kind"] for e in layer_calls]
    assert kinds.count(whole[0]) + kinds.count(split[0]) == spec.num_layers  # one forward per layer
    assert kinds.count(whole[1]) + kinds.count(split[-1]) == spec.num_layers  # one backward per layer
    assert set(kinds) <= set(whole if manifest["weights"]["layers_in_graphs"] else split)
    for e in layer_calls:
        g = graphs[e["graph"]]
        assert g["attention"] == spec.layer_types[e["layer"]]
        assert g["layer"] in (None, e["layer"])
    programs = {g["program"] for g in graphs.values() if g["role"] == "layer"}
    if manifest["weights"]["layers_in_graphs"]:
        assert len(programs) == spec.num_layers
    else:
        assert len(programs) == len(spec.attention_kinds)
