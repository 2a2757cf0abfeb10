"""ExecuTorch: each program is one `.pte` whose methods are its graphs (method name = graph kind; e.g.
`layer_forward` and `layer_backward` are two methods of `graphs/layer.pte`).

Lowering: `torch.export` of every graph -> `to_edge({kind: program, ...})` -> `to_executorch` with
ExecuTorch's memory planner. Frozen weights are graph inputs (`weights_in_graphs = False`): one
`layer.pte` serves every layer.

No delegate: graphs run on the runtime's CPU kernel library. Then every intermediate tensor is placed by
ExecuTorch's memory planner, and the method's `non_const_buffer_sizes` is the exact activation arena of
one call, recorded as `arena_bytes`.

XNNPACK was measured and not chosen (Qwen2.5-0.5B layer, seq 256, rank 8, two CPU cores). A layer
method splits into many XNNPACK partitions (16 for layer_forward, 27-28 for layer_backward at the test
spec), and most matmuls, masks and reductions stay outside them. Each delegate keeps its intermediates
in XNNPACK's own workspace, which the plan does not show, and the tensors passed between partitions
take more planned memory. The planned arena of the MeSP layer_backward grew from 23.5 MB to 81.6 MB
(MeBP: 111.7 to 136.9 MB), still without XNNPACK's share, so the figure no longer measured what a call
needs. Lowering took about 2.2x as long, a layer_backward call was only 1.1x (MeSP) to 1.5x (MeBP)
faster (the runtime's CPU kernels are not naive: 0.8 s vs 0.7 s for MeSP), and accuracy was the same
(within 2e-6 of the largest value vs eager).

Graph inputs are not planned (`alloc_graph_input=False`): the app passes its own buffers (mmapped
weights, its tensor store) and ExecuTorch reads them in place. Outputs are planned
(`alloc_graph_output=True`), so they are part of `arena_bytes`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from exporter.backends.base import Backend, GraphFn, LoweredGraph
from exporter.graph_defs import GraphDef

_NP_DTYPES = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64), "uint8": np.dtype(np.uint8)}


def lower_to_executorch(graphs: list[GraphDef]):
    """`graphs` as one ExecuTorch program (an `ExecutorchProgramManager`), one method per graph kind."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from executorch.exir.passes import MemoryPlanningPass

    kinds = [g.kind for g in graphs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"one program cannot hold two graphs of one kind: {kinds}")
    exported = {g.kind: torch.export.export(g.module, g.example_inputs()) for g in graphs}
    # No partitioner, so `to_edge`: the same program as `to_edge_transform_and_lower(exported)` (byte for
    # byte) with one decomposition pass instead of two. The edge dialect's IR check stays on: an op
    # outside core ATen fails here, not on the device.
    edge = to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=True))
    return edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, alloc_graph_output=True)))


def planned_arenas(et_program) -> dict[str, int]:
    """Method name -> planned activation bytes (all memory-planned buffers of that method's plan)."""
    return {plan.name: int(sum(plan.non_const_buffer_sizes)) for plan in et_program.executorch_program.execution_plan}


class ExecuTorchBackend(Backend):
    name = "executorch"
    weights_in_graphs = False

    def __init__(self):
        # resolved .pte path -> ((mtime_ns, size), loaded executorch.runtime.Program)
        self._programs: dict[Path, tuple[tuple[int, int], object]] = {}

    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        et = lower_to_executorch(graphs)
        arenas = planned_arenas(et)
        rel = f"graphs/{program}.pte"
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(et.buffer)
        lowered = []
        for g in graphs:
            sig = g.signature()
            lowered.append(LoweredGraph(f"{program}.{g.kind}", rel, g.kind, sig["inputs"], sig["outputs"],
                                        arena_bytes=arenas[g.kind]))
        return lowered

    def _program(self, path: Path):
        """The loaded program of `path`, reloaded when the file changed (a re-lowered program)."""
        from executorch.runtime import Runtime

        path = path.resolve()
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._programs.get(path)
        if cached is None or cached[0] != stamp:
            cached = self._programs[path] = (stamp, Runtime.get().load_program(path))
        return cached[1]

    def load(self, bundle_dir: Path, graph: dict) -> GraphFn:
        file = graph["file"]
        program = self._program(Path(bundle_dir) / file)
        if graph["method"] not in program.method_names:
            raise RuntimeError(f"{file}: no method {graph['method']!r} (has {sorted(program.method_names)})")
        method = program.load_method(graph["method"])
        specs = [(t["name"], tuple(t["shape"]), _NP_DTYPES[t["dtype"]]) for t in graph["inputs"]]

        def run(args: list[np.ndarray]) -> list[np.ndarray]:
            if len(args) != len(specs):
                raise ValueError(f"{file}:{graph['method']}: expected {len(specs)} inputs, got {len(args)}")
            tensors = []
            for (name, shape, dtype), a in zip(specs, args):
                # Inputs are not memory-planned: ExecuTorch reads these buffers in place, so they must be
                # contiguous and of the exact dtype (int64 for ids, labels, offset).
                a = np.ascontiguousarray(a, dtype=dtype)
                if a.shape != shape:
                    raise ValueError(f"{file}:{graph['method']}: input {name} has shape {list(a.shape)}, "
                                     f"expected {list(shape)}")
                with warnings.catch_warnings():  # read-only (mmapped) arrays: ExecuTorch never writes inputs
                    warnings.simplefilter("ignore", UserWarning)
                    tensors.append(torch.from_numpy(a))
            outputs = method.execute(tensors)
            return [np.array(o.detach().numpy(), copy=True) for o in outputs]

        return run


BACKEND = ExecuTorchBackend()
