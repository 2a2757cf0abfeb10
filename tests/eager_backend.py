"""A test-only backend that runs graphs with PyTorch itself (`torch.export.save` / `torch.export.load`).

It isolates the bundle pipeline (schedule, runner, weights, adapter) from any mobile runtime, so a
schedule bug and a lowering bug fail different tests.
"""
from __future__ import annotations

from pathlib import Path

import torch

from exporter.backends.base import Backend, LoweredGraph


class EagerBackend(Backend):
    name = "executorch"  # poses as a weights-as-inputs backend; the manifest schema knows only real names
    delegate = "none"

    def with_delegate(self, delegate):
        """Any delegate: the graphs always run on PyTorch (the manifest records "none")."""
        return self

    def lower(self, program, graphs, out_dir):
        out = []
        for g in graphs:
            rel = f"graphs/{program}.{g.kind}.pt2"
            (Path(out_dir) / "graphs").mkdir(parents=True, exist_ok=True)
            torch.export.save(torch.export.export(g.module, g.example_inputs()), Path(out_dir) / rel)
            sig = g.signature()
            out.append(LoweredGraph(f"{program}.{g.kind}", rel, "", sig["inputs"], sig["outputs"]))
        return out

    def load(self, bundle_dir, graph):
        module = torch.export.load(Path(bundle_dir) / graph["file"]).module()

        def run(args):
            with torch.no_grad():
                outs = module(*[torch.from_numpy(a) for a in args])
            return [o.detach().numpy() for o in outs]
        return run
