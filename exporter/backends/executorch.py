"""ExecuTorch: each program is one `.pte` whose methods are its graphs (e.g. `layer_forward` and
`layer_backward` share the program `layer.pte`).

Graphs run on ExecuTorch's portable CPU kernels, with no delegate: every intermediate tensor is
then placed by ExecuTorch's memory planner, so the method's `non_const_buffer_sizes` is the exact
activation arena a call needs (recorded as `arena_bytes`). Graph inputs are not planned
(`alloc_graph_input=False`): the app passes its own buffers (e.g. mmapped weights) without a copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from exporter.backends.base import Backend, GraphFn, LoweredGraph
from exporter.graph_defs import GraphDef


class ExecuTorchBackend(Backend):
    name = "executorch"
    weights_in_graphs = False

    def __init__(self):
        self._programs: dict[Path, object] = {}

    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass

        exported = {g.kind: torch.export.export(g.module, g.example_inputs()) for g in graphs}
        edge = to_edge_transform_and_lower(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        et = edge.to_executorch(ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, alloc_graph_output=True)))
        rel = f"graphs/{program}.pte"
        (Path(out_dir) / "graphs").mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / rel).write_bytes(et.buffer)
        arenas = {plan.name: int(sum(plan.non_const_buffer_sizes)) for plan in et.executorch_program.execution_plan}
        lowered = []
        for g in graphs:
            sig = g.signature()
            lowered.append(LoweredGraph(f"{program}.{g.kind}", rel, g.kind, sig["inputs"], sig["outputs"], arenas[g.kind]))
        return lowered

    def load(self, bundle_dir: Path, graph: dict) -> GraphFn:
        from executorch.runtime import Runtime

        path = Path(bundle_dir) / graph["file"]
        if path not in self._programs:
            self._programs[path] = Runtime.get().load_program(str(path))
        method = self._programs[path].load_method(graph["method"])

        def run(args: list[np.ndarray]) -> list[np.ndarray]:
            outputs = method.execute([torch.from_numpy(a) for a in args])
            return [o.numpy().copy() for o in outputs]

        return run


BACKEND = ExecuTorchBackend()
