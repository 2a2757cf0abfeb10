"""Core ML: ML Programs (iOS 18, float32), one multifunction `.mlpackage` per program.

A layer's frozen weights are constants of its own package `layer_XX.mlpackage`, whose functions
`layer_forward` and `layer_backward` share them: `save_multifunction` stores identical constants
once. For that the converter must not constant-fold operations on the weights (the structured
backward slices them per kv group and per MLP block, and a folded slice is a new constant that the
two functions would not share), so `common::const_elimination` is left out of the pass pipeline.
LoRA A/B are inputs (constants cannot be updated). Core ML has no int64 tensors: token ids, labels
and offsets are int32 inputs, and the manifest says so.

Conversion runs on Linux (`skip_model_load=True`); prediction needs macOS.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter.backends.base import Backend, GraphFn, LoweredGraph, RuntimeUnavailable
from exporter.graph_defs import GraphDef

WEIGHTS_BIN = "Data/com.apple.CoreML/weights/weight.bin"
_COREML_DTYPES = {"int64": "int32", "int32": "int32", "float32": "float32"}
_ARRAY_DTYPES = {65568: "float32", 131104: "int32", 65552: "float16", 65600: "float64"}


def _pass_pipeline():
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::const_elimination"])
    return pipeline


def convert(graph: GraphDef, path: Path) -> None:
    """torch.export -> Core ML ML Program saved at `path`."""
    import coremltools as ct

    exported = torch.export.export(graph.module, graph.example_inputs()).run_decompositions({})
    inputs = [ct.TensorType(name=t.name, shape=t.shape, dtype=np.dtype(_COREML_DTYPES[t.dtype]).type)
              for t in graph.inputs]
    model = ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, inputs=inputs,
                       outputs=[ct.TensorType(name=t.name) for t in graph.outputs],
                       skip_model_load=True, pass_pipeline=_pass_pipeline())
    model.save(str(path))


class CoreMLBackend(Backend):
    name = "coreml"
    weights_in_graphs = True

    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

        rel = f"graphs/{program}.mlpackage"
        target = Path(out_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="coreml-") as tmp:
            descriptor = MultiFunctionDescriptor()
            for g in graphs:
                single = Path(tmp) / f"{g.kind}.mlpackage"
                convert(g, single)
                descriptor.add_function(str(single), src_function_name="main", target_function_name=g.kind)
            descriptor.default_function_name = graphs[0].kind
            if target.exists():
                shutil.rmtree(target)
            save_multifunction(descriptor, str(target))
        lowered = []
        for g in graphs:
            sig = g.signature()
            inputs = [{**t, "dtype": _COREML_DTYPES[t["dtype"]]} for t in sig["inputs"]]
            lowered.append(LoweredGraph(f"{program}.{g.kind}", rel, g.kind, inputs, sig["outputs"]))
        return lowered

    def load(self, bundle_dir: Path, graph: dict) -> GraphFn:
        if sys.platform != "darwin":
            raise RuntimeUnavailable("Core ML prediction needs macOS; on this machine `verify` checks the packages' "
                                     "functions, signatures, shared weights and checksums instead")
        import coremltools as ct

        model = ct.models.MLModel(str(Path(bundle_dir) / graph["file"]), function_name=graph["method"])
        names = [t["name"] for t in graph["inputs"]]
        outputs = [t["name"] for t in graph["outputs"]]

        def run(args: list[np.ndarray]) -> list[np.ndarray]:
            result = model.predict(dict(zip(names, args)))
            return [np.asarray(result[name]) for name in outputs]

        return run


def describe_package(path: Path) -> dict:
    """Functions of a package with their inputs/outputs (name, shape, dtype), and the weight file size.
    Reads the package's protobuf: works on Linux, without loading the model."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))

    def features(items) -> list[dict]:
        return [{"name": f.name, "shape": [int(d) for d in f.type.multiArrayType.shape],
                 "dtype": _ARRAY_DTYPES.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType))}
                for f in items]

    functions = {f.name: {"inputs": features(f.input), "outputs": features(f.output)}
                 for f in spec.description.functions}
    weights = Path(path) / WEIGHTS_BIN
    return {"functions": functions, "weight_bin_bytes": weights.stat().st_size if weights.exists() else 0}


BACKEND = CoreMLBackend()
