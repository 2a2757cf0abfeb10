"""ExecuTorch programs lowered through XNNPACK (`--delegate xnnpack`, the ExecuTorch default): every matrix
product of the layer programs is its own XNNPACK partition and frozen weights stay graph inputs. Checked here: each lowered
graph equals eager PyTorch (rtol 1e-5), the planned arena stays within 1.2x of the portable program's
(the node order is restored after partitioning), `arena_bytes` counts XNNPACK's own heap, and tiny
bundles (float32 and int4) verify against the float64 reference. The rest of the suite builds ExecuTorch
bundles on the portable kernels (delegate "none"), which lower ~3.5x faster."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime")

from exporter import graph_defs as gd  # noqa: E402
from exporter.backends import get_backend  # noqa: E402
from exporter.backends.executorch import lower_to_executorch, planned_arenas  # noqa: E402
from graphs.config import LoraConfig  # noqa: E402
from helpers import assert_close, random_layer_weights, random_lora, run_both, tiny_spec  # noqa: E402
from runtime_harness.verify import format_report, verify  # noqa: E402

SPEC = tiny_spec()
LORA = LoraConfig(rank=4, seq_len=16)
ROWS = 128


HEAD_BLOCK = 48  # head sub-blocks of the test: 48 + 48 + 32 rows of a 128-row chunk (a shorter last block)


def step_shapes(method: str = "mesp", head_block_rows: int | None = HEAD_BLOCK) -> gd.StepShapes:
    return gd.StepShapes(SPEC, LORA, method=method, vocab_chunk_rows=ROWS, head_block_rows=head_block_rows)


@pytest.fixture(scope="module")
def xnnpack(tmp_path_factory) -> dict:
    """graph id -> (bundle dir, GraphDef, manifest entry, backend): the MeSP layer program and the loss head
    lowered by the XNNPACK backend, as a build lowers them; the head folds its chunk in sub-blocks of
    HEAD_BLOCK rows."""
    backend = get_backend("executorch").with_delegate("xnnpack")
    folder = tmp_path_factory.mktemp("xnnpack-graphs")
    s = step_shapes()
    out = {}
    for program, defs in {"layer": gd.layer_graphs(s, "full_attention"),
                          "head": [gd.head_chunk_graph(s), gd.head_finish_graph(s)]}.items():
        for g, lg in zip(defs, backend.lower(program, defs, folder)):
            out[lg.id] = (folder, g, json.loads(json.dumps(lg.to_dict())), backend)
    return out


def test_matrix_products_are_delegated_and_arena_bytes_count_xnnpack(xnnpack):
    """Every layer method and head_chunk make delegate calls (head_chunk: the logits and their gradient,
    per sub-block); arena_bytes = the planned arena + the heap XNNPACK keeps (its workspace: a packed copy
    of the largest right-hand matrix), so it exceeds the plan. head_finish has no product: no delegate,
    arena_bytes is the plan."""
    for graph_id in ("layer.layer_forward", "layer.layer_backward", "head.head_chunk"):
        entry = xnnpack[graph_id][2]
        assert entry["delegate_calls"] > 0 and entry["delegate_heap_bytes"] > 0, graph_id
        assert entry["arena_bytes"] > entry["delegate_heap_bytes"], graph_id
    # per sub-block (3): the products x W^T and e W, and the two exps of the online softmax
    assert xnnpack["head.head_chunk"][2]["delegate_calls"] == (2 + 2) * 3
    assert xnnpack["head.head_finish"][2]["delegate_calls"] == xnnpack["head.head_finish"][2]["delegate_heap_bytes"] == 0


def test_planned_arena_stays_near_the_portable_one(xnnpack):
    """Partitioning re-sorts the graph breadth first (the MeSP layer_backward plan grew ~4.5x at this size);
    `restore_order` puts the nodes back in their pre-partition order, so the plan stays within 1.2x."""
    portable = planned_arenas(lower_to_executorch(gd.layer_graphs(step_shapes(), "full_attention"), "none"))
    for kind, bytes_ in portable.items():
        entry = xnnpack[f"layer.{kind}"][2]
        planned = entry["arena_bytes"] - entry["delegate_heap_bytes"]
        assert planned <= 1.2 * bytes_, (kind, planned, bytes_)


@pytest.mark.parametrize("graph_id", ["layer.layer_forward", "layer.layer_backward"])
def test_layer_graphs_equal_eager(xnnpack, graph_id):
    weights = {k: v.float() for k, v in random_layer_weights(SPEC).items()}
    lora = {k: v.float() for k, v in random_lora(SPEC, LORA).items()}
    frozen = [weights[n] for n in SPEC.layer_weight_shapes()]
    adapters = [lora[n] for n in step_shapes().lora_names()]
    hidden = (LORA.batch, LORA.seq_len, SPEC.hidden_size)
    item = xnnpack[graph_id]
    inputs = [torch.randn(hidden)] + ([torch.randn(hidden)] if graph_id.endswith("backward") else [])
    got, want = run_both(item, [*inputs, *frozen, *adapters])
    assert all(np.abs(w).max() > 0 for w in want)
    assert_close(got, want, [t.name for t in item[1].outputs])


def test_head_graphs_equal_eager(xnnpack):
    s = step_shapes()
    C, H = s.chunk_rows, SPEC.hidden_size
    E = torch.randn(C * s.num_chunks, H)
    E[SPEC.vocab_size:] = 0  # padding rows, as the bundle stores them
    x, w = torch.randn(LORA.batch, LORA.seq_len, H), 1 + 0.1 * torch.randn(H)
    labels = torch.randint(0, SPEC.vocab_size, s.tokens)
    labels[0, 3] = -100
    state = [torch.full(s.tokens, float("-inf")), torch.zeros(s.tokens), torch.zeros(s.hidden), torch.zeros(s.hidden)]
    item = xnnpack["head.head_chunk"]
    for c in range(s.num_chunks):
        got, want = run_both(item, [x, w, labels, E[c * C:(c + 1) * C], torch.tensor([c * C]), *state])
        assert_close(got, want, [t.name for t in item[1].outputs])
        state = [torch.from_numpy(t) for t in want]
    got, want = run_both(xnnpack["head.head_finish"], [x, w, labels, *state])
    assert_close(got, want, ["loss", "dx"])
    # the sub-blocks are one online softmax: the same loss and dx as the whole chunk at once
    whole = [torch.full(s.tokens, float("-inf")), torch.zeros(s.tokens), torch.zeros(s.hidden), torch.zeros(s.hidden)]
    chunk = gd.head_chunk_graph(step_shapes(head_block_rows=None)).module
    for c in range(s.num_chunks):
        whole = list(chunk(x, w, labels, E[c * C:(c + 1) * C], torch.tensor([c * C]), *whole))
    single = gd.head_finish_graph(s).module(x, w, labels, *whole)
    assert_close([t.numpy() for t in single], want, ["loss", "dx"])


# float32 with XNNPACK (the default build) is verified at full size by CI's main job (README command 1);
# the tiny int4 bundle covers what that job does not: quantized layers and head through the delegate
@pytest.mark.parametrize("quant, group_size", [("int4", 16)])
def test_xnnpack_bundle_verifies(tiny_bundles, quant, group_size):
    bundle = tiny_bundles("qwen2", "executorch", quant, group_size, delegate="xnnpack")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["delegate"] == "xnnpack"
    delegated = {k for k, g in manifest["graphs"].items() if g["delegate_calls"]}
    assert delegated >= {"layer.attn_forward", "layer.attn_backward", "layer.mlp_block_forward",
                         "layer.mlp_block_backward", "head.head_chunk"}  # every matrix product of the step
    assert all(k.startswith("layer.") or k == "head.head_chunk" for k in delegated)
    report = verify(bundle, seed=0)
    assert len(report["tensors"]) == SPEC.num_layers * 14
    assert report["ok"], format_report(report, 5)


def test_only_the_xnnpack_backend_multiplies_the_float_head_in_blocks():
    """XNNPACK keeps a packed copy of the right-hand matrix: ExecuTorch with XNNPACK folds a float head chunk
    HEAD_BLOCK_ROWS rows at a time; the others multiply the whole chunk (ONNX Runtime copies every slice)."""
    assert get_backend("executorch").with_delegate("xnnpack").head_block_rows == gd.HEAD_BLOCK_ROWS
    assert get_backend("executorch").with_delegate("none").head_block_rows is None
    assert get_backend("ort").head_block_rows is None and get_backend("coreml").head_block_rows is None


def test_cancel_inverse_permutes_drops_only_pairs_that_undo_each_other():
    """`cancel_inverse_permutes`: a transpose of a transpose goes (x @ w.T.T reads w as given); a pair that
    composes to another permutation stays, and so does a permute that is a graph output. Same values."""
    from executorch.exir import to_edge
    from executorch.exir.dialects._ops import ops as exir_ops

    from exporter.backends.executorch import cancel_inverse_permutes

    class M(torch.nn.Module):
        def forward(self, w, x, y):
            return x @ w.T.T, y.permute(1, 2, 0).permute(1, 2, 0) + 1, w.T

    args = (torch.randn(3, 5), torch.randn(4, 3), torch.randn(2, 3, 4))
    edge = to_edge(torch.export.export(M(), args))

    def permutes(e) -> int:
        return sum(n.target == exir_ops.edge.aten.permute_copy.default for n in e.exported_program().graph.nodes)

    assert permutes(edge) == 5
    edge = edge.transform([cancel_inverse_permutes])
    assert permutes(edge) == 3
    for got, want in zip(edge.exported_program().module()(*args), M()(*args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
