"""Core ML: ML Programs (iOS 18, float32), one multifunction `.mlpackage` per program.

Each graph is exported with torch.export, converted by coremltools on its own, and the graphs of a
program become the functions (named by graph kind, the first one the default) of one package written
by `save_multifunction`. A layer's frozen weights are constants of its own package
`layer_XX.mlpackage`, whose functions `layer_forward` and `layer_backward` share them:
`save_multifunction` stores identical constants once. For that the converter must not
constant-fold operations on the weights (the backward uses them sliced per kv group and MLP block and
transposed, and a folded slice or transpose is a new constant that the two functions do not share:
2.0x the layer's bytes with the default pipeline), so `common::const_elimination` is left out of the
pass pipeline, and `where(c, fill, x)` becomes `masked_fill` (`where_fill_to_masked_fill`), which
keeps the converter from storing a broadcast fill. weight.bin is then 1.004x (mesp) and 1.005x (mebp)
of a Qwen2.5-0.5B layer's 59.6 MB (the rest: the causal mask, rotary positions, zero biases). LoRA A/B
are inputs (constants cannot be updated). Core ML has no int64 tensors: token ids, labels and offsets
are int32 inputs, and the manifest says so.

Conversion runs on any OS (`skip_model_load=True`). `load` runs a function with the Core ML framework on
macOS and with the NumPy MIL interpreter (`mil_runtime`) elsewhere; `MIL_RUNTIME` forces the interpreter
(`--runtime mil`). `describe_package` reads a package's functions and signatures from its protobuf.
"""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import tempfile
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch

from exporter.backends import coreml_exact
from exporter.backends.base import Backend, GraphFn, LoweredGraph, RuntimeUnavailable
from exporter.graph_defs import GraphDef

WEIGHTS_BIN = "Data/com.apple.CoreML/weights/weight.bin"
MANIFEST = "Manifest.json"
_COREML_DTYPES = {"int64": "int32", "int32": "int32", "float32": "float32", "float16": "float16"}
# Core ML ArrayFeatureType.ArrayDataType values
_ARRAY_DTYPES = {65568: "float32", 131104: "int32", 65552: "float16", 65600: "float64", 131080: "int8"}


def _pass_pipeline():
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::const_elimination"])
    coreml_exact.add_to(pipeline)  # epsilons the converter adds -> 0 (see coreml_exact)
    return pipeline


@contextlib.contextmanager
def _converter_session():
    """Quiet coremltools' progress bars (the build draws its own), and let `save_multifunction` validate
    the merged program once instead of after each of its ~110 skipped passes (a skipped pass changes
    nothing, so the result is the same; it saves ~8 s per layer program)."""
    from coremltools.converters.mil.frontend.torch import ops as torch_ops
    from coremltools.converters.mil.mil import program as mil_program
    from coremltools.converters.mil.mil.passes import pass_pipeline
    from tqdm import tqdm

    quiet = functools.partial(tqdm, disable=True)
    validate = mil_program.Program.validate
    validated: set = set()

    def validate_once_if_unchanged(self, *args, **kwargs):
        if not self.skip_all_passes:
            return validate(self, *args, **kwargs)
        key = (id(self), args, tuple(sorted(kwargs.items())))
        if key not in validated:
            validate(self, *args, **kwargs)
            validated.add(key)

    saved = (pass_pipeline.tqdm, torch_ops._tqdm)
    pass_pipeline.tqdm, torch_ops._tqdm = quiet, quiet
    mil_program.Program.validate = validate_once_if_unchanged
    try:
        yield
    finally:
        pass_pipeline.tqdm, torch_ops._tqdm = saved
        mil_program.Program.validate = validate


def _scalar_fill(node) -> float | None:
    """The value of a node that fills a tensor with one scalar (`torch.zeros_like(x)`, `torch.tensor(-inf)`)."""
    aten = torch.ops.aten
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.scalar_tensor.default:
        return node.args[0]
    if node.target == aten.zeros_like.default:
        return 0.0
    if node.target in (aten.full_like.default, aten.full.default):
        return node.args[1]
    return None


def where_fill_to_masked_fill(exported: torch.export.ExportedProgram) -> int:
    """`where(c, fill, x)` -> `masked_fill(x, c, fill)` and `where(c, x, fill)` -> `masked_fill(x, ~c, fill)`
    where x has the result's shape and dtype: the same values. coremltools broadcasts the three operands
    of `where` to one shape first, so a scalar fill becomes a constant of the result's shape (the autodiff
    backward's masked softmax gradient: (B, kv, group, S, S) floats, 3.7 MB a layer for Qwen2.5-0.5B;
    `zeros_like` of the embedding rows), while its `masked_fill` is a broadcasting `select`. Edits the
    program in place; returns the number of rewritten nodes."""
    aten = torch.ops.aten
    graph = exported.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.where.self or "val" not in node.meta:
            continue
        cond, a, b = node.args
        out = node.meta["val"]
        for fill, x, invert in ((a, b, False), (b, a, True)):
            value = _scalar_fill(fill)
            if value is None or not isinstance(x, torch.fx.Node):
                continue
            fill_val, val = fill.meta.get("val"), x.meta.get("val")
            if fill_val is None or val is None or fill_val.dtype != out.dtype \
                    or val.shape != out.shape or val.dtype != out.dtype:
                continue
            with graph.inserting_before(node):
                mask = cond
                if invert:
                    mask = graph.call_function(aten.logical_not.default, (cond,))
                    mask.meta["val"] = cond.meta.get("val")
                replacement = graph.call_function(aten.masked_fill.Scalar, (x, mask, value))
                replacement.meta.update(node.meta)
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            count += 1
            break
    if count:
        graph.eliminate_dead_code()
        exported.graph_module.recompile()
    return count


def _gelu_decompositions() -> dict:
    """aten.gelu as elementary ops (torch's own decomposition: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    for approximate="tanh"). coremltools reads gelu's `approximate` only as a positional input, but
    torch.export passes it as a keyword, so the converter silently emits the EXACT (erf) gelu: GeGLU's
    tanh gelu would be wrong by up to ~1e-3."""
    from torch._decomp import decomposition_table

    return {torch.ops.aten.gelu.default: decomposition_table[torch.ops.aten.gelu.default]}


def export(graph: GraphDef) -> torch.export.ExportedProgram:
    """The graph as the converter takes it: torch.export, ATen ops (gelu decomposed),
    `where_fill_to_masked_fill`."""
    exported = torch.export.export(graph.module, graph.example_inputs()).run_decompositions(_gelu_decompositions())
    where_fill_to_masked_fill(exported)
    return exported


def coreml_inputs(graph: GraphDef) -> list[dict]:
    """The graph's inputs as the Core ML function takes them (int64 -> int32)."""
    return [{**t, "dtype": _COREML_DTYPES[t["dtype"]]} for t in graph.signature()["inputs"]]


def convert(graph: GraphDef, path: Path) -> None:
    """torch.export -> Core ML ML Program saved at `path`, with the GraphDef's input and output names."""
    import coremltools as ct

    exported = export(graph)
    inputs = [ct.TensorType(name=t["name"], shape=tuple(t["shape"]), dtype=np.dtype(t["dtype"]).type)
              for t in coreml_inputs(graph)]
    # Without explicit outputs Core ML names them after the last op (`add_42`, ...).
    outputs = [ct.TensorType(name=t.name) for t in graph.outputs]
    model = ct.convert(exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, inputs=inputs, outputs=outputs,
                       skip_model_load=True, pass_pipeline=_pass_pipeline())
    coreml_exact.check_exact(model._mil_program, label=f"{graph.kind} ")  # refuses, naming the op
    model.save(str(path))


class CoreMLBackend(Backend):
    name = "coreml"
    weights_in_graphs = True

    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

        kinds = [g.kind for g in graphs]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"program {program}: graph kinds must be unique function names, got {kinds}")
        rel = f"graphs/{program}.mlpackage"
        target = Path(out_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="coreml-") as tmp, _converter_session():
            descriptor = MultiFunctionDescriptor()
            for g in graphs:
                single = Path(tmp) / f"{g.kind}.mlpackage"
                convert(g, single)
                descriptor.add_function(str(single), src_function_name="main", target_function_name=g.kind)
            descriptor.default_function_name = graphs[0].kind
            if target.exists():
                shutil.rmtree(target)
            save_multifunction(descriptor, str(target))
        return [LoweredGraph(f"{program}.{g.kind}", rel, g.kind, coreml_inputs(g), g.signature()["outputs"])
                for g in graphs]

    def __init__(self, interpreter: bool | None = None):
        self._templates: dict = {}  # make (one per layer kind and build) -> LayerTemplate or None
        #: True: the NumPy MIL interpreter; False: the Core ML framework; None: the framework on macOS,
        #: the interpreter elsewhere.
        self.interpreter = sys.platform != "darwin" if interpreter is None else interpreter

    def lower_baked(self, program: str, make, weights: dict, out_dir: Path) -> list[LoweredGraph]:
        """A layer program: converted once per `make` (see `LayerTemplate`), then each layer's package is the
        template's with that layer's weight bytes; where the template cannot prove that, converted directly."""
        if make not in self._templates:  # one template per layer kind (e.g. Gemma's sliding and full layers)
            self._templates[make] = LayerTemplate.create(self, make, weights)
        template = self._templates[make]
        if template is None:
            return self.lower(program, make(weights), out_dir)
        return template.write(program, weights, out_dir)

    @property
    def runtime(self) -> str:
        return ("mil: NumPy MIL interpreter (exporter/backends/mil_runtime.py)" if self.interpreter
                else "coreml: Core ML framework, CPU only")

    def load(self, bundle_dir: Path, graph: dict) -> GraphFn:
        inputs, outputs = graph["inputs"], graph["outputs"]
        if self.interpreter:
            from exporter.backends.mil_runtime import load_function

            fn = load_function(Path(bundle_dir) / graph["file"], graph["method"])
            predict = fn
        else:
            if sys.platform != "darwin":
                raise RuntimeUnavailable("the Core ML framework runs on macOS only; use --runtime mil (the NumPy "
                                         "MIL interpreter) here")
            import coremltools as ct

            # CPU only: float32 throughout (the Neural Engine computes in float16), for replaying gradients.
            model = ct.models.MLModel(str(Path(bundle_dir) / graph["file"]), function_name=graph["method"],
                                      compute_units=ct.ComputeUnit.CPU_ONLY)
            predict = model.predict

        def run(args: list[np.ndarray]) -> list[np.ndarray]:
            if len(args) != len(inputs):
                raise ValueError(f"{graph['method']} takes {len(inputs)} inputs, got {len(args)}")
            feed = {t["name"]: np.ascontiguousarray(np.asarray(a), dtype=t["dtype"]).reshape(t["shape"])
                    for t, a in zip(inputs, args)}
            result = predict(feed)
            return [np.asarray(result[t["name"]], dtype=t["dtype"]).reshape(t["shape"]) for t in outputs]

        return run


def _sentinels(weights: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors shaped and typed like `weights`: distinct values, findable byte for byte."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype) for k, v in weights.items()}


def _blob_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().numpy().tobytes()


def _manifest_items(package: Path) -> list:
    """Package Manifest.json entries without their random identifiers."""
    return sorted(json.dumps(v, sort_keys=True) for v in json.loads((package / MANIFEST).read_text())["itemInfoEntries"].values())


class LayerTemplate:
    """A layer program converted once, whose packages are then written per layer by swapping weight bytes.

    The program is converted twice, with two sets of random sentinel weights A and B. The swap is used only
    when the conversion provably copies each weight into `weight.bin` unchanged: both packages have the
    same `model.mlmodel` byte for byte (and `Manifest.json` but for its random item identifiers), every
    weight's A bytes occur in A's
    `weight.bin` (each occurrence a region), B's `weight.bin` holds B's bytes in exactly those regions, and
    the two files are equal everywhere else. A layer's package is then A's with that layer's bytes in the
    regions: what converting it directly writes (the conversion cannot depend on the weights' values)."""

    def __init__(self, graphs: list[LoweredGraph], package: Path, regions: dict[str, list[int]], shapes: dict,
                 tmp: str):
        self.graphs, self.package, self.regions, self.shapes = graphs, package, regions, shapes
        self.weight_bin = (package / WEIGHTS_BIN).read_bytes()
        weakref.finalize(self, shutil.rmtree, tmp, True)

    @classmethod
    def create(cls, backend: "CoreMLBackend", make, weights: dict) -> "LayerTemplate | None":
        tmp = tempfile.mkdtemp(prefix="coreml-template-")
        a, b = _sentinels(weights, 1), _sentinels(weights, 2)
        lowered = backend.lower("template", make(a), Path(tmp) / "a")
        backend.lower("template", make(b), Path(tmp) / "b")
        pa, pb = Path(tmp) / "a/graphs/template.mlpackage", Path(tmp) / "b/graphs/template.mlpackage"
        files = sorted(p.relative_to(pa).as_posix() for p in pa.rglob("*") if p.is_file())
        if files != sorted(p.relative_to(pb).as_posix() for p in pb.rglob("*") if p.is_file()) \
                or any((pa / f).read_bytes() != (pb / f).read_bytes() for f in files if f not in (WEIGHTS_BIN, MANIFEST)) \
                or _manifest_items(pa) != _manifest_items(pb):
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        bin_a, bin_b = (pa / WEIGHTS_BIN).read_bytes(), (pb / WEIGHTS_BIN).read_bytes()
        covered = np.zeros(len(bin_a), dtype=bool)
        regions: dict[str, list[int]] = {}
        for name in weights:
            blob_a, blob_b = _blob_bytes(a[name]), _blob_bytes(b[name])
            at = bin_a.find(blob_a)
            while at >= 0:
                if bin_b[at:at + len(blob_b)] != blob_b:
                    break
                regions.setdefault(name, []).append(at)
                covered[at:at + len(blob_a)] = True
                at = bin_a.find(blob_a, at + len(blob_a))
            if at >= 0 or name not in regions:
                shutil.rmtree(tmp, ignore_errors=True)
                return None
        diff = np.frombuffer(bin_a, np.uint8) != np.frombuffer(bin_b, np.uint8) if len(bin_a) == len(bin_b) else None
        if diff is None or (diff & ~covered).any():
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        return cls(lowered, pa, regions, {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}, tmp)

    def write(self, program: str, weights: dict, out_dir: Path) -> list[LoweredGraph]:
        rel = f"graphs/{program}.mlpackage"
        target = Path(out_dir) / rel
        got = {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}
        if got != self.shapes:
            raise ValueError(f"{program}: the weights' names, shapes or dtypes differ from the template's")
        data = bytearray(self.weight_bin)
        for name, offsets in self.regions.items():
            blob = _blob_bytes(weights[name])
            for at in offsets:
                data[at:at + len(blob)] = blob
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.package, target, ignore=lambda d, names: [n for n in names if n == "weight.bin"])
        (target / WEIGHTS_BIN).write_bytes(bytes(data))
        # fresh item identifiers, as a conversion writes; keys sorted as Core ML's ModelPackage writes them
        # (it rewrites a Manifest.json whose keys are not, which would change the bundle's checksums)
        manifest = json.loads((self.package / MANIFEST).read_text())
        ids = {item: str(uuid.uuid4()) for item in manifest["itemInfoEntries"]}
        manifest["itemInfoEntries"] = {ids[k]: v for k, v in manifest["itemInfoEntries"].items()}
        manifest["rootModelIdentifier"] = ids[manifest["rootModelIdentifier"]]
        (target / MANIFEST).write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
        return [LoweredGraph(g.id.replace("template.", f"{program}.", 1), rel, g.method, g.inputs, g.outputs)
                for g in self.graphs]


def describe_package(path: Path) -> dict:
    """Functions of a package with their inputs/outputs (name, shape, dtype), the default function and
    the weight file size. Reads the package's protobuf: works on Linux, without loading the model."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))

    def features(items) -> list[dict]:
        return [{"name": f.name, "shape": [int(d) for d in f.type.multiArrayType.shape],
                 "dtype": _ARRAY_DTYPES.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType))}
                for f in items]

    description = spec.description
    if description.functions:
        functions = {f.name: {"inputs": features(f.input), "outputs": features(f.output)}
                     for f in description.functions}
        default = description.defaultFunctionName
    else:  # a single-function package
        functions = {"main": {"inputs": features(description.input), "outputs": features(description.output)}}
        default = "main"
    weights = Path(path) / WEIGHTS_BIN
    return {"functions": functions, "default_function": default,
            "weight_bin_bytes": weights.stat().st_size if weights.exists() else 0}


BACKEND = CoreMLBackend()  # the framework on macOS, the interpreter elsewhere
MIL_RUNTIME = CoreMLBackend(interpreter=True)  # `--runtime mil`: the interpreter on any OS
