"""ExecuTorch: each program is one `.pte` whose methods are its graphs (method name = graph kind; e.g.
`layer_forward` and `layer_backward` are two methods of `graphs/layer.pte`).

Lowering: `torch.export` of every graph -> edge dialect (with `cancel_inverse_permutes`: no transposed
copy of a weight stored transposed) -> `to_executorch` with ExecuTorch's memory planner. Frozen weights
are graph inputs (`weights_in_graphs = False`): one `layer.pte` serves every layer, and no weight is ever
baked into a program.

Delegate (`--delegate`, `BuildConfig.delegate`; default xnnpack):

- `xnnpack`: in the layer programs and the loss head's chunk (`delegated_program`: embed, head_finish
  and optimizer have no products and stay portable; the head multiplies its chunk 2048 rows at a time,
  so XNNPACK's packed copy of it is 7.3 MB, not the chunk's 28.7 MB), every matrix product
  (linear / addmm / mm / bmm) is its own XNNPACK partition
  (`_matmul_partitioner`: per-op mode, the right-hand matrix a runtime input, so XNNPACK reads W as
  given: no transposed copy of W, no constant), and so is every `cat` and `floor`: the int4 unpacking's
  nibble split and interleave, whose portable `cat` copies one float at a time (a 4864 x 896 int4
  matrix: portable dequantization + product 43.6 ms, 29.8 ms with these two ops on XNNPACK, 16.9 ms for
  the float32 product alone; whole int4 steps 1.2x faster); so is every `permute_copy`, `softmax`, `exp`
  and `sigmoid`, whose portable kernels are many times slower (figures at `_matmul_partitioner`).
  Everything else (norms, RoPE, masks, the other dequantization ops) stays on the portable kernels:
  putting mul and sub on XNNPACK too made float32 steps slower (each op a delegate call). Fusing the
  partitions re-sorts the graph breadth first, and the memory plan follows node order: the MeSP layer_backward
  arena grew 4.4x (tiny test layer: 62 KB to 273 KB). `restore_order` puts the nodes back in their
  pre-partition order (a topological sort that prefers the earlier original position), after which the
  plans are smaller than the portable ones (layer_forward 13.7 MB vs 16.1 MB, layer_backward 20.5 MB vs
  23.2 MB). XNNPACK keeps its own heap outside the plan: a workspace holding a packed copy of the
  largest right-hand matrix it multiplies (4.4 MB: one MLP block's 1216 x 896 weights) plus each
  delegate's runtime. `delegate_heap_bytes` measures it (a fresh process, glibc `mallinfo2` around
  loading and running the method once) and `arena_bytes` = planned arena + that heap (layer_forward
  18.4 MB, layer_backward 25.8 MB), recorded per graph with `delegate_calls` and `delegate_heap_bytes`.
  Measured on Qwen2.5-0.5B (seq 256, rank 8, MeSP, two shared CPU cores, both variants in one
  process): a layer_forward call is 3.6x and a layer_backward call 3.0x faster than on the portable
  kernels and their outputs agree within 2e-6 of the largest value; over whole training steps
  (`BundleRunner`, both bundles alternating in one process) the layer_forward calls took 3.7x, the
  layer_backward calls 2.7x and the step 2.2x less time (16.8 s vs 37.5 s), with the same loss to 1e-6. Measured step memory (`runtime_harness memory`): 180.9 MB vs 182.0 MB. Lowering the layer
  program takes ~4x longer (76 s vs 19 s, the heap measurement included).
- `none`: every op on the runtime's portable CPU kernels. Every intermediate tensor is placed by the
  memory planner, and `arena_bytes` is the method's `non_const_buffer_sizes` (the exact activation arena
  of one call). The test suite builds its bundles this way (faster lowering).

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
from exporter.config import DELEGATES
from exporter.graph_defs import GraphDef

_NP_DTYPES = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64), "uint8": np.dtype(np.uint8)}


def _matmul_partitioner():
    """An XnnpackPartitioner that claims matrix products, `cat`, `floor`, `permute`, `softmax`, `exp` and
    `sigmoid`, one partition per op (`per_op_mode`), and takes the right-hand matrix as a runtime input
    (`force_non_static_weights_for_f32_linear`: frozen weights are graph inputs, not constants). It records
    each method's node order before partitioning (`orders`, one name -> position dict per method, in the
    order the methods are partitioned).

    Which ops: those whose portable kernel is many times slower than XNNPACK's, so that a delegate call of
    their own pays (measured on Qwen2.5-0.5B graphs, 2 threads): `permute_copy` (heads split and merged,
    k^T and p^T; portable: 16 of a 64 ms attention backward, XNNPACK's transpose 1.1 ms), `softmax`, `exp`
    (the loss head: 12 of a 72 ms chunk), `sigmoid`. With them an attention forward went from 30.7 to
    14.7 ms, an attention backward from 64 to 41 ms, a head chunk from 72 to 60 ms. Cheap elementwise ops
    (mul, add, sub) stay portable: as calls of their own they made float32 steps slower."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import AddmmConfig, LinearConfig, MMConfig
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        BMMConfig, CatConfig, ExpConfig, FloorConfig, PermuteConfig, SigmoidConfig, SoftmaxConfig)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    configs = [LinearConfig, AddmmConfig, MMConfig, BMMConfig, CatConfig, FloorConfig, PermuteConfig, SoftmaxConfig,
               ExpConfig, SigmoidConfig]

    class MatmulPartitioner(XnnpackPartitioner):
        def __init__(self):
            super().__init__(configs=configs, per_op_mode=True, force_non_static_weights_for_f32_linear=True)
            self.orders: list[dict[str, int]] = []

        def partition(self, exported_program):
            self.orders.append({n.name: i for i, n in enumerate(exported_program.graph.nodes)})
            return super().partition(exported_program)

    return MatmulPartitioner()


def _is_delegate_call(node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "executorch_call_delegate"


def _node_priorities(gm, order: dict[str, int]) -> dict:
    """node -> its position before partitioning: a kept node's own, a delegate call's = its matrix
    product's (the first node of the lowered partition); None for nodes partitioning made (the lowered
    module's get_attr, the getitems of a delegate's outputs), which follow their inputs."""
    prio = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            prio[node] = -1
        elif node.op == "output":
            prio[node] = len(order)
        elif node.name in order:
            prio[node] = order[node.name]
        elif _is_delegate_call(node):
            lowered = getattr(gm, node.args[0].target)
            inner = [order[n.name] for n in lowered.original_module.graph.nodes if n.name in order
                     and n.op == "call_function"]
            prio[node] = min(inner) if inner else None
        else:
            prio[node] = None
    return prio


def restore_order(gm, order: dict[str, int]) -> None:
    """Reorder `gm`'s nodes in place to the order before partitioning (`order`: name -> position).

    Fusing partitions re-sorts the whole graph topologically (breadth first), which moves producers far
    from their consumers: ExecuTorch's memory plan follows the node order, so the MeSP layer_backward
    arena grew ~5x. This is a topological sort (Kahn) that always takes, among the ready nodes, the one
    that came first before partitioning; nodes partitioning made take their inputs' latest position."""
    import heapq

    prio = _node_priorities(gm, order)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(n.all_input_nodes) for n in nodes}
    effective = {}

    def push(heap, node):
        p = prio[node]
        effective[node] = p if p is not None else max((effective[a] for a in node.all_input_nodes), default=-1)
        heapq.heappush(heap, (effective[node], index[node], node))

    heap: list = []
    for n in nodes:
        if pending[n] == 0:
            push(heap, n)
    ordered = []
    while heap:
        node = heapq.heappop(heap)[2]
        ordered.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                push(heap, user)
    if len(ordered) != len(nodes):
        raise RuntimeError("restore_order: the graph has a cycle")
    for node in ordered:  # appending each node in turn (before the root sentinel) rebuilds the list in order
        gm.graph._root.prepend(node)
    gm.graph.lint()
    gm.recompile()


def cancel_inverse_permutes(gm: torch.fx.GraphModule):
    """permute(permute(x, p), q) -> x where the two undo each other (p[q[i]] = i): an edge-dialect pass.

    The split layer graphs read the down projection stored transposed (`graph_defs.TRANSPOSED`) and the
    math multiplies by its transpose again: in eager PyTorch two views, in the edge dialect two
    `permute_copy`s, each a copy on the portable kernels (10.5 ms of a 30 ms Qwen2.5-0.5B MLP block forward
    for a 1216 x 896 block; ONNX Runtime's and Core ML's own optimizers drop such pairs). A pair whose outer
    permute is a graph output is kept (an output must not be an input)."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    permute = exir_ops.edge.aten.permute_copy.default
    changed = False
    for node in list(gm.graph.nodes):
        inner = node.args[0] if node.op == "call_function" and node.target == permute else None
        if not (isinstance(inner, torch.fx.Node) and inner.op == "call_function" and inner.target == permute):
            continue
        p, q = list(inner.args[1]), list(node.args[1])
        n = len(p)
        if [p[q[i] % n] % n for i in range(n)] != list(range(n)) or any(u.op == "output" for u in node.users):
            continue
        node.replace_all_uses_with(inner.args[0])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, changed)


def lower_to_executorch(graphs: list[GraphDef], delegate: str = "none"):
    """`graphs` as one ExecuTorch program (an `ExecutorchProgramManager`), one method per graph kind;
    `delegate` "xnnpack" lowers every matrix product through XNNPACK (`_matmul_partitioner`), "none"
    leaves every op to the runtime's portable kernels."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    kinds = [g.kind for g in graphs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"one program cannot hold two graphs of one kind: {kinds}")
    if delegate not in DELEGATES["executorch"]:
        raise ValueError(f"unknown ExecuTorch delegate {delegate!r}")
    exported = {g.kind: torch.export.export(g.module, g.example_inputs()) for g in graphs}
    # The edge dialect's IR check stays on: an op outside core ATen fails here, not on the device.
    compile_config = EdgeCompileConfig(_check_ir_validity=True)
    if delegate == "none":
        # No partitioner, so `to_edge`: the same program as `to_edge_transform_and_lower(exported)` (byte
        # for byte) with one decomposition pass instead of two.
        edge = to_edge(exported, compile_config=compile_config).transform([cancel_inverse_permutes])
    else:
        partitioner = _matmul_partitioner()
        edge = to_edge_transform_and_lower(exported, transform_passes=[cancel_inverse_permutes],
                                           partitioner=[partitioner], compile_config=compile_config)
        if len(partitioner.orders) != len(kinds):
            raise RuntimeError(f"the partitioner saw {len(partitioner.orders)} methods, expected {len(kinds)}")
        for kind, order in zip(exported, partitioner.orders):
            restore_order(edge.exported_program(kind).graph_module, order)
    return edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, alloc_graph_output=True)))


def planned_arenas(et_program) -> dict[str, int]:
    """Method name -> planned activation bytes (all memory-planned buffers of that method's plan)."""
    return {plan.name: int(sum(plan.non_const_buffer_sizes)) for plan in et_program.executorch_program.execution_plan}


def delegate_calls(et_program) -> dict[str, int]:
    """Method name -> number of delegate calls in its plan (0 for portable kernels only)."""
    return {plan.name: len(plan.delegates) for plan in et_program.executorch_program.execution_plan}


# graph kinds lowered through the delegate; the other programs (embedding gather, head_finish, optimizer:
# no matrix products) stay on the portable kernels
DELEGATED_KINDS = ("layer_forward", "layer_backward", "attn_forward", "attn_backward", "mlp_block_forward",
                   "mlp_block_backward", "head_chunk")


def delegated_program(graphs: list[GraphDef]) -> bool:
    """Whether a program goes through the delegate: the layer programs and the loss head, which together
    do every matrix product of a step (the head's logits and their gradient are ~20% of a Qwen2.5-0.5B
    step's FLOPs, and on the portable kernels ~40% of its time). The head multiplies its vocabulary chunk
    `graph_defs.HEAD_BLOCK_ROWS` rows at a time, so the packed copy of the right-hand matrix that XNNPACK
    keeps in its workspace is one such block (2048 x 896 floats, 7.3 MB), not the whole chunk (28.7 MB)."""
    return any(g.kind in DELEGATED_KINDS for g in graphs)


_HEAP_PROBE = """
import ctypes, gc, json, sys
import torch
from executorch.runtime import Runtime

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2

def heap():
    gc.collect()
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # bytes in use: small chunks + mmapped chunks

path, method, specs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
program = Runtime.get().load_program(path)
inputs = [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in specs]
before = heap()
loaded = program.load_method(method)
outputs = loaded.execute(inputs)
del outputs
print(json.dumps({"loaded_and_run": heap() - before}))
"""


def delegate_heap_bytes(path: Path, graph: GraphDef) -> int:
    """Heap bytes a method keeps outside its memory plan once loaded and run: the XNNPACK delegates'
    runtimes and workspace (its packed copy of the right-hand matrix of a product with non-constant
    weights, allocated on the first call), plus ExecuTorch's per-method bookkeeping (a few hundred KB,
    so the figure is an upper bound). Measured with glibc's `mallinfo2` in a fresh process on zero
    inputs (XNNPACK shares one workspace between methods: measured alone, each method counts it)."""
    import json
    import subprocess
    import sys

    specs = json.dumps([[list(t.shape), t.dtype] for t in graph.inputs])
    done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, str(path), graph.kind, specs],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring {path.name}:{graph.kind} failed: {tail}")
    return max(0, int(json.loads(done.stdout.strip().splitlines()[-1])["loaded_and_run"]))


_loaded_with: list[int] = []  # the threadpool size this process's first program was loaded with


def use_threads() -> None:
    """Size ExecuTorch's shared threadpool (XNNPACK's workers) to `exporter.threads.threads()` before the
    process's first program loads. XNNPACK delegates keep the pool they were created with, so once a
    program is loaded, another count is refused (ThreadsError) rather than silently ignored."""
    from executorch.extension.pybindings import portable_lib

    from exporter.threads import ThreadsError, threads

    n = threads()
    if not _loaded_with:
        if portable_lib._threadpool_get_thread_count() != n:
            portable_lib._unsafe_reset_threadpool(n)
        _loaded_with.append(n)
    elif _loaded_with[0] != n:
        raise ThreadsError(f"ExecuTorch already runs with {_loaded_with[0]} threads in this process; "
                           f"{n} takes a new process")


class ExecuTorchBackend(Backend):
    name = "executorch"
    weights_in_graphs = False

    def __init__(self, delegate: str = "none"):
        self.delegate = delegate
        # resolved .pte path -> ((mtime_ns, size), loaded executorch.runtime.Program)
        self._programs: dict[Path, tuple[tuple[int, int], object]] = {}

    @property
    def head_block_rows(self) -> int | None:
        """XNNPACK keeps a packed copy of the right-hand matrix it multiplies: a head block, not a chunk."""
        from exporter.graph_defs import HEAD_BLOCK_ROWS

        return HEAD_BLOCK_ROWS if self.delegate == "xnnpack" else None

    def with_delegate(self, delegate: str | None) -> "ExecuTorchBackend":
        """This backend lowering through `delegate` ("xnnpack" or "none"; None: the default, xnnpack)."""
        from exporter.config import DEFAULT_DELEGATE

        delegate = DEFAULT_DELEGATE[self.name] if delegate is None else delegate
        if delegate not in DELEGATES[self.name]:
            raise ValueError(f"unknown delegate {delegate!r}; choose from {', '.join(DELEGATES[self.name])}")
        return self if delegate == self.delegate else ExecuTorchBackend(delegate)

    def lower(self, program: str, graphs: list[GraphDef], out_dir: Path) -> list[LoweredGraph]:
        et = lower_to_executorch(graphs, self.delegate if delegated_program(graphs) else "none")
        arenas = planned_arenas(et)
        rel = f"graphs/{program}.pte"
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(et.buffer)
        delegated = delegate_calls(et)
        lowered = []
        for g in graphs:
            sig = g.signature()
            heap = delegate_heap_bytes(path, g) if delegated[g.kind] else 0
            lowered.append(LoweredGraph(f"{program}.{g.kind}", rel, g.kind, sig["inputs"], sig["outputs"],
                                        arena_bytes=arenas[g.kind] + heap,
                                        extra={"delegate_calls": delegated[g.kind], "delegate_heap_bytes": heap}))
        return lowered

    def _program(self, path: Path):
        """The loaded program of `path`, reloaded when the file changed (a re-lowered program)."""
        from executorch.runtime import Runtime

        path = path.resolve()
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._programs.get(path)
        if cached is None or cached[0] != stamp:
            use_threads()
            cached = self._programs[path] = (stamp, Runtime.get().load_program(path))
        return cached[1]

    releases_programs = True

    def release(self, bundle_dir: Path, file: str) -> None:
        """Forget the loaded program: its methods (cached by the program) and their arenas go with it. A
        program's host methods share one set of arenas sized to the largest, so a program is released whole."""
        self._programs.pop((Path(bundle_dir) / file).resolve(), None)

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


BACKEND = ExecuTorchBackend().with_delegate(None)  # the default delegate (xnnpack)
