"""FLOPs counted from a graph's shapes (`exporter.flops`) against the closed formula of a decoder layer
and of the loss head, for every family; and the manifest's per-graph `flops` on every backend."""
from __future__ import annotations

import json

import pytest

from exporter import graph_defs as gd
from exporter.backends import BACKEND_NAMES
from exporter.flops import graph_flops
from graphs.config import LoraConfig
from helpers import TINY_FAMILY_SPECS


def layer_forward_flops(spec, lora: LoraConfig, tokens: int, kind: str, query_rows: int | None = None) -> int:
    """2 T (sum over the projections of out x in) + LoRA's 2 T r (in + out) per target + attention's QK^T
    and PV, 2 head_dim per score and query head each: causal layers compute all T^2 scores (the mask
    comes after) or, in query blocks, each block's keys up to its last query; sliding layers only their
    query blocks' key bands (`graphs.ops.attention_blocks`)."""
    from graphs.ops import attention_blocks

    shapes = spec.layer_weight_shapes()
    dense = sum(o * i for n, (o, i) in ((n, s) for n, s in shapes.items() if n.endswith("proj.weight")))
    low_rank = sum(lora.rank * (o + i) for o, i in (shapes[f"{m}.weight"] for m in lora.modules))
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
    scores = sum((q.stop - q.start) * (k.stop - k.start) for q, k in attention_blocks(tokens, spec.window(kind), query_rows))
    return 2 * tokens * (dense + low_rank) + 2 * (2 * scores * head_dim * spec.num_heads)


@pytest.mark.parametrize("method, query_rows", [("mesp", None), ("mesp", 3), ("mebp", None)])
@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
def test_layer_flops_match_the_formula(family, method, query_rows):
    spec = TINY_FAMILY_SPECS[family]
    lora = LoraConfig(seq_len=8)
    s = gd.StepShapes(spec, lora, method=method, query_rows=query_rows)
    for kind in spec.attention_kinds:
        forward, backward = gd.layer_graphs(s, kind)
        assert graph_flops(forward) == layer_forward_flops(spec, lora, 8, kind, query_rows), kind
        # the backward recomputes the forward and multiplies dy back through every matrix (and LoRA's
        # factors): more than twice the forward, less than three times
        assert 2 * graph_flops(forward) < graph_flops(backward) < 3 * graph_flops(forward), kind


def test_head_flops_are_the_logits_and_their_gradient():
    spec = TINY_FAMILY_SPECS["qwen2"]
    s = gd.StepShapes(spec, LoraConfig(seq_len=8), vocab_chunk_rows=64)
    assert graph_flops(gd.head_chunk_graph(s)) == 2 * (2 * 8 * spec.hidden_size * s.chunk_rows)
    assert graph_flops(gd.embed_chunk_graph(s)) == 0  # a gather


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_every_graph_of_a_bundle_carries_its_flops(tiny_bundles, backend):
    bundle = tiny_bundles("qwen2", backend)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = TINY_FAMILY_SPECS["qwen2"]
    lora = LoraConfig(**{k: manifest["lora"][k] for k in ("rank", "alpha")}, seq_len=manifest["seq_len"])
    for graph in manifest["graphs"].values():
        assert graph["flops"] >= 0
        if graph["kind"] == "layer_forward":
            assert graph["flops"] == layer_forward_flops(spec, lora, manifest["seq_len"], graph["attention"])
    calls = [e for e in manifest["schedules"]["eval_loss"] if e["op"] == "call" and e["layer"] == 0]
    if manifest["graphs"][calls[0]["graph"]]["kind"] == "attn_forward":  # sub-layer calls: the layer's sum, plus
        # each MLP block's own LoRA h = m A^T (gate, up) and s h B^T (down) terms, r x H each
        blocks = sum(manifest["graphs"][e["graph"]]["kind"] == "mlp_block_forward" for e in calls)
        mlp_adapted = sum(m.startswith("mlp.") for m in lora.modules)
        extra = (blocks - 1) * 2 * manifest["seq_len"] * lora.rank * spec.hidden_size * mlp_adapted
        assert sum(manifest["graphs"][e["graph"]]["flops"] for e in calls) == extra + layer_forward_flops(
            spec, lora, manifest["seq_len"], spec.layer_types[0])
