"""The contract every backend implements (ExecuTorch's `preprocess` in spirit: small and one-way).

A *program* is one file that holds one or more graphs (ExecuTorch methods, Core ML functions);
`lower` writes it under `out_dir` and describes each graph for the manifest. A backend that cannot
put several graphs in one file writes one file per graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exporter.graph_defs import GraphDef, StepShapes


@dataclass
class LoweredGraph:
    """What the manifest records for one graph: graph id `<program>.<kind>`."""

    id: str
    file: str  # relative to the bundle root
    method: str  # method (ExecuTorch), function (Core ML) or "" (one graph per file)
    inputs: list[dict]
    outputs: list[dict]
    arena_bytes: int | None = None  # planned activation memory of one call, when the runtime plans it
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"file": self.file, "method": self.method, "inputs": self.inputs, "outputs": self.outputs,
             "arena_bytes": self.arena_bytes}
        d.update(self.extra)
        return d


class RuntimeUnavailable(RuntimeError):
    """The backend's runtime cannot execute graphs on this machine (Core ML off macOS)."""


GraphFn = Callable[[list[np.ndarray]], list[np.ndarray]]


class Backend:
    name: str = ""
    #: which runtime `load` uses, in words (reports say which one ran)
    runtime: str = ""
    #: True: a layer's frozen weights are baked into a per-layer program (forward and backward
    #: share them); False: one program serves every layer and weights are inputs read from
    #: `weights/layer_XX.safetensors`.
    weights_in_graphs: bool = False
    #: the delegate its programs are lowered through (`exporter.config.DELEGATES`); None: the backend has none
    delegate: str | None = None
    #: float32 LM-head rows a head_chunk multiplies at once (`graph_defs.StepShapes.head_block_rows`); None:
    #: the whole vocabulary chunk
    head_block_rows: int | None = None
    #: True: `release` frees what a loaded program holds and reloading costs milliseconds, so the runner
    #: releases programs the next calls do not use; False: graphs stay loaded (sessions costly to create)
    releases_programs: bool = False

    def with_delegate(self, delegate: str | None) -> "Backend":
        """This backend lowering through `delegate` (None: its default). A backend without delegates
        refuses any (ValueError)."""
        if delegate is not None:
            raise ValueError(f"the {self.name} backend has no delegates (got {delegate!r})")
        return self

    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        """Export `graphs` (all traced with torch.export) into one program file under `out_dir/graphs/`."""
        raise NotImplementedError

    def lower_baked(self, program: str, make: Callable[[dict], list[GraphDef]], weights: dict, out_dir: Path
                    ) -> list[LoweredGraph]:
        """Lower the graphs `make(weights)` of a program whose frozen `weights` are baked in (a layer of a
        `weights_in_graphs` backend). Calls with the same `make` differ only in the weights' values, so a
        backend may convert the program once and write each layer's weights into it."""
        return self.lower(program, make(weights), out_dir)

    def write_training_artifacts(self, shapes: StepShapes, lora_state: dict, out_dir: Path) -> dict:
        """Backend-specific training files (ORT: checkpoint + optimizer model). Returns manifest fields."""
        return {}

    def release(self, bundle_dir: Path, file: str) -> None:
        """Free what the runtime holds for program `file` once the runner dropped every GraphFn of it (its
        methods' arenas; the runner does this when the next calls do not use the program). Default: nothing
        (a runtime whose loaded graphs hold no memory between calls, or whose reload costs too much)."""

    def load(self, bundle_dir: Path, graph: dict) -> GraphFn:
        """An executable for one manifest graph entry (`LoweredGraph.to_dict()`): it takes numpy arrays in
        the order of `graph["inputs"]` and returns numpy arrays in the order of `graph["outputs"]`.
        Raises RuntimeUnavailable where the runtime cannot run here."""
        raise NotImplementedError
