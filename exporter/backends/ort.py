"""ONNX Runtime backend: one `.onnx` file per graph, plus ORT training artifacts for the optimizer.

Lowering: `torch.export` -> `torch.onnx.export(..., dynamo=True)` at opset `OPSET` -> one self-contained file `graphs/<program>.<kind>.onnx` whose graph
inputs/outputs carry the `GraphDef` names, stamped IR version <= `MAX_IR_VERSION` (ONNX Runtime 1.19
loads IR <= 10 and opset <= 21). Frozen weights are graph inputs (`weights_in_graphs = False`), so files
are small; external data is only used past the 2 GB protobuf limit. The exporter's own optimizer is not
used (its "x + 0 -> x" rule deletes `+ 1e-8`, AdamW's eps; see `_optimize`), and torch.onnx's per-node
provenance metadata (stack traces with local paths) is stripped, so the bytes do not depend on the machine.

`arena_bytes` is None: ONNX Runtime plans activation memory inside the session at run time (memory
patterns) and exposes no static plan to read back.

Training artifacts (`write_training_artifacts`), under `training/`:
  checkpoint            ORT CheckpointState: every LoRA tensor, as a trainable parameter, under its bundle
                        state name (`lora.<layer>.<module>.lora_A|B`, no renaming). ORT lists them sorted
                        by name; the manifest's `ort_training.parameters` is that same order (checked).
  training_model.onnx   a "gradient injection" model: inputs named as the schedule's store names for
                        the gradients (`grad.<layer>.<module>.lora_A|B`, one per parameter, in
                        `parameters` order), loss = sum_i ReduceSum(p_i * grad_i). ORT's own gradient of
                        that loss w.r.t. p_i is exactly grad_i, so `Module.train_step(*grads)` loads the
                        gradients that the bundle's layer_backward graphs computed into the parameters'
                        gradient buffers; the loss value itself is meaningless.
  optimizer_model.onnx  ORT's SGDOptimizerV2 / AdamWOptimizer (com.microsoft) over all parameters,
                        stamped IR 10 (generate_artifacts writes the current `onnx.IR_VERSION`). AdamW is
                        switched to `adam_mode = 0` (torch.optim.AdamW: decoupled decay applied before the
                        update, bias correction on m and v separately) with the bundle's AdamWSettings;
                        ORT's onnxblock default is mode 1 (Hugging Face: bias correction folded into the
                        learning rate, so eps is added to the uncorrected sqrt(v); weight decay after the
                        update) and eps 1e-6. Both differ from torch only where eps or decay matter.
  (eval_model.onnx, which generate_artifacts also writes, is dropped: there is nothing to evaluate.)

Driving them (onnxruntime-training 1.19.2; the bundle's `train_step_ort_api` schedule, see
`exporter.schedule`): CheckpointState.load_checkpoint, then Module, then Optimizer; only then set
parameter values (`state.parameters[name].data = ...`): setting them before Module exists segfaults.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter.backends.base import Backend, GraphFn, LoweredGraph
from exporter.graph_defs import GraphDef, StepShapes
from exporter.bundle_format import TRAINING_DIR, grad_of
from graphs import optim as optim_math

# torch.onnx logs one warning per torchvision op it cannot register: noise for this tool.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 18  # torchlib's native opset (no version conversion); ORT 1.19 runs <= 21
MAX_IR_VERSION = 10  # ORT 1.19 loads IR <= 10
_PROTOBUF_LIMIT = 1_800_000_000  # bytes; past this, initializers go to external data

# --------------------------------------------------------------------------------------------- lowering

def export_onnx(graph: GraphDef, opset: int = OPSET):
    """`graph` as an onnx.ModelProto with the GraphDef's input/output names (IR <= MAX_IR_VERSION)."""
    example = graph.example_inputs()
    ep = torch.export.export(graph.module, example)  # (mebp's autograd ops are already core ATen: graph_defs)

    in_names, out_names = [t.name for t in graph.inputs], [t.name for t in graph.outputs]
    program = torch.onnx.export(ep, (), dynamo=True, input_names=in_names, output_names=out_names,
                                opset_version=opset, optimize=False, verbose=False)
    _optimize(program.model)
    model = program.model_proto
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    for node in model.graph.node:  # torch.onnx's per-node fx provenance (stack traces with local paths):
        del node.metadata_props[:]  # 5/6 of the file, and it would make the bytes machine-dependent
        node.doc_string = ""
    got_in, got_out = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if got_in != in_names or got_out != out_names:  # torch.onnx keeps unused inputs; anything else is a bug
        raise RuntimeError(f"{graph.kind}: ONNX signature {got_in} -> {got_out} does not match "
                           f"{in_names} -> {out_names}")
    return model


def _optimize(model) -> None:
    """Constant folding and dead/duplicate node removal, in place on the onnx_ir model.

    Not `torch.onnx.export(optimize=True)`: onnxscript's default rewrite rules include "x + 0 -> x" and
    "x * 1 -> x" whose constant match uses math.isclose(abs_tol=1e-8), so `+ 1e-8` (AdamW's eps) is
    deleted (onnxscript 0.7.2). ONNX Runtime applies its own (exact) graph optimizations at load.
    """
    import onnx_ir.passes.common as common_passes
    import onnxscript.optimizer

    common_passes.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model)
    for p in (common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
              common_passes.RemoveUnusedOpsetsPass(),
              common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              common_passes.DeduplicateInitializersPass(), common_passes.CommonSubexpressionEliminationPass(),
              common_passes.RemoveUnusedNodesPass()):
        p(model)


def _save(model, path: Path) -> str | None:
    """Save one file; returns the external data file name when the model is too large for one protobuf."""
    import onnx

    if model.ByteSize() < _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return None
    location = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return location


# --------------------------------------------------------------------------------------------- runtime

def session_options(num_threads: int | None = None):
    """CPU session settings: no memory arena (freed tensors go back to the system, so measured memory
    follows tensor lifetimes), sequential execution, intra-op threads = `exporter.threads.threads()`
    unless given, and no spinning.

    Spinning off: a step runs many sessions back to back (a mesp layer: attention, MLP blocks, finish,
    each its own session with its own intra-op pool), and a pool that spin-waits after its run keeps the
    cores busy while the next session's pool works. Measured on the 2-core VM (qwen2.5-0.5b, the sessions
    of one layer in schedule order): a mesp layer 272 -> 148 ms, a mebp layer 218 -> 163 ms. An app should
    do the same (`session.intra_op.allow_spinning` = 0), which also spares a phone's battery."""
    import onnxruntime as ort

    from exporter.threads import threads

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = num_threads or threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


_NP_DTYPES = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8}


class OrtBackend(Backend):
    name = "ort"
    weights_in_graphs = False

    def __init__(self, num_threads: int | None = None, profile_prefix: Path | None = None):
        self.num_threads = num_threads
        self.profile_prefix = profile_prefix  # set: every session records ORT's profile (`end_profiling`)
        self._sessions: dict[tuple, object] = {}  # (path, mtime, size, threads) -> InferenceSession

    # ---- lowering
    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        out_dir = Path(out_dir)
        (out_dir / "graphs").mkdir(parents=True, exist_ok=True)
        lowered = []
        for g in graphs:
            rel = f"graphs/{program}.{g.kind}.onnx"
            external = _save(export_onnx(g), out_dir / rel)
            self._session(out_dir / rel)  # must load in ONNX Runtime (CPU EP), or the build fails here
            sig = g.signature()
            extra = {"external_data": f"graphs/{external}"} if external else {}
            # arena_bytes: ORT plans activation memory inside the session; no static plan to report.
            lowered.append(LoweredGraph(f"{program}.{g.kind}", rel, "", sig["inputs"], sig["outputs"],
                                        arena_bytes=None, extra=extra))
        return lowered

    # ---- execution
    def _session(self, path: Path):
        import onnxruntime as ort

        from exporter.threads import threads

        path = Path(path).resolve()
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, self.num_threads or threads())
        sess = self._sessions.get(key)
        if sess is None:
            for old in [k for k in self._sessions if k[0] == key[0]]:  # a rebuilt file: drop the stale session
                del self._sessions[old]
            options = session_options(self.num_threads)
            if self.profile_prefix is not None:
                options.enable_profiling = True
                options.profile_file_prefix = f"{self.profile_prefix}_{path.stem.replace('.', '_')}"
            sess = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            self._sessions[key] = sess
        return sess

    def end_profiling(self) -> list[tuple[str, str, int]]:
        """Stop profiling every session: (graph file name, ORT's trace JSON, the profile's start in
        `time.time_ns()` units: ORT reads the system clock) per session; event `ts` values are microseconds after that start."""
        done = []
        for key, sess in self._sessions.items():
            done.append((Path(key[0]).name, sess.end_profiling(), sess.get_profiling_start_time_ns()))
        self._sessions.clear()
        return done

    def load(self, bundle_dir: Path, graph: dict) -> GraphFn:
        sess = self._session(Path(bundle_dir) / graph["file"])
        inputs = [(t["name"], _NP_DTYPES[t["dtype"]]) for t in graph["inputs"]]
        outputs = [t["name"] for t in graph["outputs"]]
        have = {i.name for i in sess.get_inputs()}
        missing = [n for n, _ in inputs if n not in have]
        if missing:
            raise RuntimeError(f"{graph['file']}: model lacks inputs {missing}")

        def run(args: list[np.ndarray]) -> list[np.ndarray]:
            if len(args) != len(inputs):
                raise ValueError(f"{graph['file']}: expected {len(inputs)} inputs, got {len(args)}")
            feeds = {n: np.ascontiguousarray(a, dtype=dt) for (n, dt), a in zip(inputs, args)}
            return sess.run(outputs, feeds)

        return run

    # ---- training artifacts
    def write_training_artifacts(self, shapes: StepShapes, lora_state: dict, out_dir: Path) -> dict:
        names = sorted(lora_state)  # ORT's CheckpointState lists parameters sorted by name
        params = {n: np.ascontiguousarray(torch.as_tensor(lora_state[n]).detach().to(torch.float32).cpu().numpy())
                  for n in names}
        target = Path(out_dir) / TRAINING_DIR
        target.mkdir(parents=True, exist_ok=True)
        files = generate_training_artifacts(params, shapes.optimizer, target)
        rel = {k: f"{TRAINING_DIR}/{v}" for k, v in files.items()}
        listed = checkpoint_parameter_names(target / files["checkpoint"])
        if listed != names:
            raise RuntimeError(f"ORT lists the checkpoint's parameters in another order: {listed[:3]}")
        notes = ("Schedule train_step_ort_api. Once: state = CheckpointState.load_checkpoint(checkpoint); "
                 "module = Module(training_model, state, device='cpu'); optimizer = Optimizer(optimizer_model, "
                 "module) (in this order; set state.parameters[name].data only after Module exists: before, "
                 "onnxruntime-training 1.19.2 segfaults). At the ort_training_step entry: "
                 "state.parameters[p].data = store[p] for p in parameters; module.train(); "
                 "module.lazy_reset_grad(); module(*[store[g] for g in gradients]) (copies them into the "
                 "gradient buffers: d/dp_i of sum_i sum(p_i * g_i) = g_i; its loss output is meaningless); "
                 "optimizer.set_learning_rate(lr); optimizer.step(); store[p] = state.parameters[p].data; "
                 "free the gradients. The Optimizer keeps its own step count and AdamW moments (the store's "
                 "optim.* tensors are unused on this path; save them with CheckpointState.save_checkpoint(state, "
                 "path, include_optimizer_state=True)). lr 0 leaves the parameters unchanged but still advances "
                 "AdamW's step and moments, on this path as in the optimizer graphs.")
        entry = {"checkpoint": rel["checkpoint"], "training_model": rel["training_model"],
                 "optimizer_model": rel["optimizer_model"], "optimizer": shapes.optimizer,
                 "parameters": names, "gradient_inputs": [grad_of(n) for n in names],
                 "notes": notes}
        if shapes.optimizer == "adamw":
            entry["adamw"] = {**vars(optim_math.AdamWSettings()), "adam_mode": 0, "correct_bias": 1}
        return {"ort_training": entry}


BACKEND = OrtBackend()


# --------------------------------------------------------------------------------------- training files

def checkpoint_parameter_names(path: Path) -> list[str]:
    """The parameter names of an ORT checkpoint, in the order ORT lists them."""
    from onnxruntime.training.api import CheckpointState

    return [name for name, _ in CheckpointState.load_checkpoint(str(path)).parameters]


def gradient_injection_model(params: dict[str, np.ndarray], opset: int = OPSET):
    """initializers p_i, inputs grad.<p_i>, loss = sum_i ReduceSum(p_i * grad_i) (a chain of Adds: ORT has
    no gradient for Sum)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, terms = [], [], []
    for i, (name, value) in enumerate(params.items()):
        g = grad_of(name)
        inputs.append(helper.make_tensor_value_info(g, TensorProto.FLOAT, list(value.shape)))
        nodes.append(helper.make_node("Mul", [name, g], [f"prod_{i}"]))
        nodes.append(helper.make_node("ReduceSum", [f"prod_{i}"], [f"term_{i}"], keepdims=0))
        terms.append(f"term_{i}")
    acc = terms[0]
    for j, term in enumerate(terms[1:]):
        out = "loss" if j == len(terms) - 2 else f"partial_{j}"
        nodes.append(helper.make_node("Add", [acc, term], [out]))
        acc = out
    if len(terms) == 1:
        nodes.append(helper.make_node("Identity", [acc], ["loss"]))
    graph = helper.make_graph(nodes, "lora_gradient_injection", inputs,
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              initializer=[numpy_helper.from_array(v, n) for n, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=MAX_IR_VERSION)


def optimizer_block(optimizer: str, settings: optim_math.AdamWSettings = optim_math.AdamWSettings()):
    from onnxruntime.training import onnxblock

    if optimizer == "sgd":
        return onnxblock.optim.SGD()
    if optimizer == "adamw":
        return onnxblock.optim.AdamW(bias_correction=True, betas=(settings.beta1, settings.beta2),
                                     eps=settings.eps, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def generate_training_artifacts(params: dict[str, np.ndarray], optimizer: str, target: Path) -> dict[str, str]:
    """checkpoint + training_model.onnx + optimizer_model.onnx in `target`; returns their names."""
    import onnx
    from onnxruntime.training import artifacts

    if not params:
        raise ValueError("no LoRA parameters to train")
    model = gradient_injection_model(params)
    target = Path(target)
    with tempfile.TemporaryDirectory(dir=target, prefix=".artifacts-") as tmp, _native_stderr_quiet():
        artifacts.generate_artifacts(model, requires_grad=list(params), loss=None,
                                     optimizer=optimizer_block(optimizer), artifact_directory=tmp)
        tmp = Path(tmp)
        for name in ("training_model.onnx", "optimizer_model.onnx"):
            m = onnx.load(str(tmp / name))
            m.ir_version = min(m.ir_version, MAX_IR_VERSION)  # stamped with the current onnx.IR_VERSION
            if name == "optimizer_model.onnx" and optimizer == "adamw":
                _set_attribute(m, "AdamWOptimizer", "adam_mode", 0)  # torch.optim.AdamW semantics
            onnx.save_model(m, str(target / name))
        dst = target / "checkpoint"
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        shutil.move(str(tmp / "checkpoint"), str(dst))
    return {"checkpoint": "checkpoint", "training_model": "training_model.onnx",
            "optimizer_model": "optimizer_model.onnx"}


def _set_attribute(model, op_type: str, attr: str, value: int) -> None:
    found = False
    for node in model.graph.node:
        if node.op_type == op_type:
            for a in node.attribute:
                if a.name == attr:
                    a.i, found = value, True
    if not found:
        raise RuntimeError(f"no {op_type}.{attr} in the optimizer model")


@contextlib.contextmanager
def _native_stderr_quiet():
    """ORT's gradient-graph builder logs every graph transformer at INFO to fd 2 whatever the logger
    severity; hold that output back and show it only if generation fails."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)
