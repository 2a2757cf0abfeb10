"""A NumPy runtime for Core ML ML Programs: runs a package's functions on any OS by interpreting their MIL
ops with the table in `mil_ops`.

1. load: coremltools' own MIL protobuf loader (`milproto.load.load`, private API, covered by
   tests/test_mil_runtime.py) turns the package's `model.mlmodel` into a pymil Program with every
   function of a multifunction package; blob constants are read from `weights/weight.bin` by
   coremltools' BlobReader. One Program per package is kept, so the functions of a layer package share
   their constants as they do on device.
2. compile: a function becomes a flat list of steps (op type, input names, output names); const ops are
   evaluated once; each intermediate is dropped after its last use.
3. run: inputs are cast to the function's declared dtypes (int64 token ids -> int32, as on device);
   the outputs come back in the order the caller names them.

It proves the converted graph's math (every op as MIL defines it) in float32; it does not prove Apple's
kernels, fp16 compute on the Neural Engine, or the GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.backends.mil_ops import MILError, run_op

WEIGHTS_DIR = "Data/com.apple.CoreML/weights"


def load_program(package: Path):
    """The pymil Program of an `.mlpackage` (all functions), via coremltools' milproto loader."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise MILError(f"{package} is not an ML Program")
    return load(spec, spec.specificationVersion, file_weights_dir=str(Path(package) / WEIGHTS_DIR))


def _np_dtype(var) -> np.dtype:
    from coremltools.converters.mil.mil import types

    dtype = var.dtype
    return np.dtype(types.nptype_from_builtin(dtype))


@dataclass
class _Step:
    op_type: str
    name: str
    inputs: dict  # input name -> var name, or tuple of var names
    outputs: list[str]
    free: list[str]  # intermediates whose last use is this step


class CompiledFunction:
    """One MIL function as a list of NumPy steps."""

    def __init__(self, function, name: str):
        self.name = name
        self.inputs = {n: _np_dtype(v) for n, v in function.inputs.items()}
        self.outputs = [v.name for v in function.outputs]
        self.constants: dict[str, np.ndarray] = {}
        self.steps: list[_Step] = []
        for op in function.operations:
            if op.blocks:
                raise MILError(f"{name}: op {op.op_type} ({op.name}) has nested blocks, which the interpreter "
                               "does not run")
            if op.op_type == "const":
                out = op.outputs[0]
                self.constants[out.name] = np.asarray(out.val, dtype=_np_dtype(out))
                continue
            inputs = {k: tuple(x.name for x in v) if isinstance(v, (list, tuple)) else v.name
                      for k, v in op.inputs.items()}
            self.steps.append(_Step(op.op_type, op.name, inputs, [o.name for o in op.outputs], []))
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for v in step.inputs.values():
                for n in (v if isinstance(v, tuple) else (v,)):
                    last[n] = i
        keep = set(self.constants) | set(self.outputs)
        for n, i in last.items():
            if n not in keep:
                self.steps[i].free.append(n)

    @property
    def op_types(self) -> set[str]:
        return {s.op_type for s in self.steps}

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feed)
        if missing:
            raise MILError(f"{self.name}: missing inputs {sorted(missing)}")
        env: dict[str, np.ndarray] = {n: np.asarray(feed[n], dtype=dt) for n, dt in self.inputs.items()}
        consts = self.constants

        def value(n):
            return env[n] if n in env else consts[n]

        for step in self.steps:
            kwargs = {k: tuple(value(n) for n in v) if isinstance(v, tuple) else value(v)
                      for k, v in step.inputs.items()}
            try:
                result = run_op(step.op_type, kwargs)
            except MILError as e:
                raise MILError(f"{self.name}: op {step.name} ({step.op_type}): {e}") from None
            if len(step.outputs) == 1:
                env[step.outputs[0]] = result
            else:
                for n, r in zip(step.outputs, result):
                    env[n] = r
            for n in step.free:
                env.pop(n, None)
        return {n: value(n) for n in self.outputs}


@functools.lru_cache(maxsize=None)
def _package(path: str, mtime_ns: int) -> dict[str, CompiledFunction]:
    program = load_program(Path(path))
    return {name: CompiledFunction(fn, name) for name, fn in program.functions.items()}


def load_function(package: Path, function: str) -> CompiledFunction:
    """Function `function` of the package (one compiled Program per package file, shared by its functions)."""
    package = Path(package).resolve()
    functions = _package(str(package), (package / "Data/com.apple.CoreML/model.mlmodel").stat().st_mtime_ns)
    if function not in functions:
        raise MILError(f"{package} has no function {function!r} (it has {', '.join(functions)})")
    return functions[function]
