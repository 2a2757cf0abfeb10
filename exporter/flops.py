"""FLOPs of a graph, counted from its shapes.

`graph_flops(g)` runs the GraphDef's module once on fake tensors (shapes and dtypes, no data, no
compute) under torch's `FlopCounterMode`, which counts the matrix products (mm, bmm, addmm, baddbmm,
convolutions, attention) at 2 FLOPs per multiply-add; elementwise ops are not counted (the usual
convention: they are a small share of the FLOPs, and memory-bound). The count is exactly what the
graph multiplies: a MeSP backward counts its recomputation, a MeBP backward the autograd graph it runs.
"""
from __future__ import annotations

from exporter.graph_defs import GraphDef


def graph_flops(g: GraphDef) -> int:
    """Matrix-product FLOPs of one call of `g` (2 per multiply-add)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = g.example_inputs()
        with FlopCounterMode(display=False) as counter:
            g.module(*inputs)
    return int(counter.get_total_flops())
