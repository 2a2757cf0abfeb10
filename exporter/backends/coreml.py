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
# Core ML inputs have no int64 or uint8 type: ids and (quantized embedding / head chunks') codes are int32
_COREML_DTYPES = {"int64": "int32", "int32": "int32", "float32": "float32", "float16": "float16", "uint8": "int32"}
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


@functools.cache
def _register_dequantize() -> None:
    """Convert `ondevice_lora::dequantize` (`exporter.quant_op`: a baked layer's quantized matrix, dequantized
    whole) to `constexpr_blockwise_shift_scale(data, scale, offset)` = (data - offset) * scale, blocks of
    K / G columns: the codes stored as uint4 (int4: two per byte, low nibble first, byte for byte the
    bundle's qweight) or uint8, the scales float32, the zero points as offsets. Stored once per package;
    both functions of a layer use the same constant."""
    import coremltools.converters.mil.frontend._utils as frontend_utils
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    from graphs import quant

    @register_torch_op(torch_alias=["ondevice_lora::dequantize", "ondevice_lora.dequantize"])
    def ondevice_lora_dequantize(context, node):
        qweight, scales, zeros, bits = _get_inputs(context, node, expected=4)
        if qweight.val is None or scales.val is None or zeros.val is None:
            raise ValueError(f"{node.name}: ondevice_lora::dequantize needs constant codes, scales and zero points")
        codes = quant.unpack(torch.from_numpy(np.asarray(qweight.val, dtype=np.uint8)), int(bits.val))
        out = frontend_utils._construct_constexpr_dequant_op(
            codes.numpy().astype(np.uint8), np.asarray(zeros.val, dtype=np.uint8),
            np.asarray(scales.val, dtype=np.float32), axis=None, name=node.name)
        context.add(out, node.name)


def export(graph: GraphDef) -> torch.export.ExportedProgram:
    """The graph as the converter takes it: torch.export, ATen ops (gelu decomposed),
    `where_fill_to_masked_fill`."""
    # uint8 inputs (quantized embedding / head chunks' codes) are int32 in Core ML: traced as int32
    example = tuple(t.to(torch.int32) if t.dtype == torch.uint8 else t for t in graph.example_inputs())
    exported = torch.export.export(graph.module, example).run_decompositions(_gelu_decompositions())
    where_fill_to_masked_fill(exported)
    return exported


def coreml_inputs(graph: GraphDef) -> list[dict]:
    """The graph's inputs as the Core ML function takes them (int64 -> int32)."""
    return [{**t, "dtype": _COREML_DTYPES[t["dtype"]]} for t in graph.signature()["inputs"]]


def convert(graph: GraphDef, path: Path) -> None:
    """torch.export -> Core ML ML Program saved at `path`, with the GraphDef's input and output names."""
    import coremltools as ct

    _register_dequantize()
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
        if template is None or not template.accepts(weights):
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
    """Random tensors shaped and typed like `weights`, stored the same way (`_storage`): distinct values,
    findable byte for byte."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in weights.items():
        if v.dtype == torch.uint8:  # quantization codes / zero points: random codes of the same storage
            out[k] = torch.randint(0, 16 if _storage(v) == "uint4" else 256, v.shape, generator=gen, dtype=torch.uint8)
        else:
            out[k] = torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype)
    return out


def _storage(t: torch.Tensor) -> str:
    """How weight.bin holds a baked tensor: float32; uint8 codes that all fit in 4 bits become uint4 (the
    converter's rule), two per byte, low nibble first; other uint8 stay bytes."""
    if t.dtype == torch.uint8:
        return "uint4" if int(t.max()) <= 15 else "uint8"
    return "float32"


def _blob_bytes(t: torch.Tensor) -> bytes:
    """The bytes weight.bin holds for a baked tensor (`_storage`). An int4 qweight is already two codes per
    byte, low nibble first, which is byte for byte Core ML's uint4 of the unpacked codes."""
    if t.dtype == torch.uint8:
        a = t.detach().contiguous().numpy().reshape(-1)
        if _storage(t) == "uint4" and a.size % 2 == 0:
            return (a[0::2] | (a[1::2] << 4)).astype(np.uint8).tobytes()
        return a.tobytes()
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
        return cls(lowered, pa, regions, {k: (tuple(v.shape), v.dtype, _storage(v)) for k, v in weights.items()}, tmp)

    def accepts(self, weights: dict) -> bool:
        """Whether `weights` are stored as the template's were (names, shapes, dtypes and storage: a layer
        whose int8 codes all fit in 4 bits would be stored as uint4, and is converted directly instead)."""
        return {k: (tuple(v.shape), v.dtype, _storage(v)) for k, v in weights.items()} == self.shapes

    def write(self, program: str, weights: dict, out_dir: Path) -> list[LoweredGraph]:
        rel = f"graphs/{program}.mlpackage"
        target = Path(out_dir) / rel
        if not self.accepts(weights):
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
