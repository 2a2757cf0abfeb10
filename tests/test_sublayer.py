"""Sub-layer calls (README, "Sub-layer calls"): a mesp bundle with weights as inputs runs each layer as an
attention call and MLP channel-block calls, each reading only its rows of the layer file, so no call holds a
whole layer's weights; the blocks are equal and start on quantization groups; the down projection is stored
transposed so that every weight source is a row range. (That the calls compute the layer exactly:
test_graphs_math.py's sub-layer test against float64 autograd, and every bundle's `verify`.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from exporter.graph_defs import StepShapes
from exporter.registry import MODELS
from exporter.weights import open_weights
from graphs.config import LoraConfig
from graphs.quant import QuantFormat
from helpers import TINY_FAMILY_SPECS, runnable_backends

QUANTS = [("none", None), ("int4", 8)]


@pytest.mark.parametrize("quant, group", QUANTS, ids=[q for q, _ in QUANTS])
@pytest.mark.parametrize("backend", runnable_backends(weights_as_inputs=True))
def test_each_layer_tensor_is_read_once_per_pass_in_row_ranges(backend, quant, group, tiny_bundles):
    bundle = tiny_bundles("qwen2", backend, quant, group)
    manifest = json.loads((bundle / "manifest.json").read_text())
    header = load_file(str(bundle / "weights" / "layer_01.safetensors"))
    calls = [e for e in manifest["schedules"]["eval_loss"] if e["op"] == "call" and e["layer"] == 1]
    kinds = [manifest["graphs"][e["graph"]]["kind"] for e in calls]
    blocks = kinds.count("mlp_block_forward")
    assert kinds == ["attn_forward", *["mlp_block_forward"] * blocks, "mlp_finish"] and blocks > 1
    read: dict[str, list] = {}
    for e in calls:
        for source in e["inputs"].values():
            if isinstance(source, dict) and "file" in source:
                assert source["file"] == "weights/layer_01.safetensors"
                read.setdefault(source["tensor"], []).append(source.get("rows"))
    layer_bytes = sum(t.nbytes for t in header.values())
    for name, t in header.items():
        ranges = read[name]
        if t.ndim == 1 and name.endswith("layernorm.weight"):
            continue  # norms: read whole by each call that applies them
        if None in ranges:  # whole: the attention's tensors (one call)
            assert ranges == [None], name
            continue
        bounds = sorted(ranges)  # the blocks tile the rows exactly
        assert bounds[0][0] == 0 and bounds[-1][1] == t.shape[0], name
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), name
    heaviest = max(e["memory"]["weights_bytes"] for e in calls)
    assert heaviest < 0.5 * layer_bytes  # no call holds the whole layer


@pytest.mark.parametrize("backend", runnable_backends(weights_as_inputs=True))
def test_split_layer_file_stores_the_down_projection_transposed(backend, tiny_bundles, family_checkpoint):
    bundle = tiny_bundles("qwen2", backend)
    stored = load_file(str(bundle / "weights" / "layer_00.safetensors"))
    assert "mlp.down_proj.weight" not in stored
    down = open_weights(str(family_checkpoint("qwen2")), TINY_FAMILY_SPECS["qwen2"]).layer(0)["mlp.down_proj.weight"]
    np.testing.assert_array_equal(stored["mlp.down_proj.weight.T"], down.numpy().T)


@pytest.mark.parametrize("model", ["qwen2.5-0.5b", "qwen2.5-3b"])
@pytest.mark.parametrize("quant", [None, QuantFormat("int4", 64), QuantFormat("int4", 0), QuantFormat("int8", 0)],
                         ids=["float", "int4-g64", "int4-row", "int8-row"])
@pytest.mark.parametrize("asked", [1, 4, 17, 100])
def test_mlp_blocks_are_equal_group_aligned_and_at_least_as_many_as_asked(model, quant, asked):
    spec = MODELS[model]
    s = StepShapes(spec, LoraConfig(), quant=quant, mlp_blocks=asked, split_layers=True)
    c, I = s.mlp_block_rows, spec.intermediate_size
    align = 1 if quant is None else (quant.group_size or quant.per_byte)
    units, n = I // align, I // c
    assert I % c == 0 and c % align == 0 and n >= min(asked, units)  # (at most one block per group)
    assert s.mlp_bounds()[-1][1] == I and len(s.mlp_bounds()) == n
    # the smallest such count: no divisor of I / align between `asked` and the chosen count
    assert not any(units % d == 0 for d in range(min(asked, units), n))


def test_executorch_sublayer_graphs_never_transpose_a_frozen_weight():
    """Lowered through XNNPACK, no `permute_copy` reads a frozen weight, directly or through a slice: the stored
    down^T is multiplied as linear's weight (`graphs.ops.matmul`; the transpose pair of the forward cancelled by
    `cancel_inverse_permutes`), o_proj's columns likewise, so no call copies a weight matrix to transpose it (a
    1216 x 896 block: 10.5 ms of a 30 ms MLP block forward at Qwen2.5-0.5B). One family: the products are the
    shared per-op code of every family (`graphs.ops`, `graphs.layer`), and lowering them takes ~28 s a family.
    (attn_backward multiplies o_proj's columns as they are stored, like the gate / up rows.)"""
    import torch
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.dialects._ops import ops as exir_ops

    from exporter.backends.executorch import _matmul_partitioner, cancel_inverse_permutes
    from exporter.graph_defs import layer_graphs

    shapes = StepShapes(TINY_FAMILY_SPECS["qwen2"], LoraConfig(seq_len=8), split_layers=True)
    graphs = [g for g in layer_graphs(shapes, "full_attention")
              if g.kind in ("attn_forward", "mlp_block_forward", "mlp_block_backward")]
    exported = {g.kind: torch.export.export(g.module, g.example_inputs()) for g in graphs}
    edge = to_edge_transform_and_lower(exported, transform_passes=[cancel_inverse_permutes],
                                       partitioner=[_matmul_partitioner()])
    through = (exir_ops.edge.aten.slice_copy.Tensor, exir_ops.edge.aten.view_copy.default)
    for g in graphs:
        ep = edge.exported_program(g.kind)
        names = dict(zip(ep.graph_signature.user_inputs, (t.name for t in g.inputs)))
        transposed = []
        for node in ep.graph.nodes:
            if node.op == "call_function" and node.target == exir_ops.edge.aten.permute_copy.default:
                source = node.args[0]
                while source.op == "call_function" and source.target in through:
                    source = source.args[0]
                if source.op == "placeholder" and "_proj_weight" in names.get(source.name, ""):
                    transposed.append(names[source.name])
        assert not transposed, f"{g.kind} transposes {transposed}"
