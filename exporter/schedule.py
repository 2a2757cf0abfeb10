"""A training step as data: the ordered calls an app makes, with what goes in, comes out and is freed.

Store names (the app's tensor store; everything else lives only inside a call):
    batch.input_ids, batch.labels, lr          step inputs
    lora.{i}.{module}.lora_A / .lora_B         LoRA parameters (state: live across steps)
    optim.{i}.step, optim.{i}.exp_avg.{...}    optimizer state (state; adamw only)
    x.{i}                                      input of layer i (the only activations kept), x.{L} final
    dy                                         the running gradient w.r.t. the current layer output
    grad.{i}.{module}.lora_A / .lora_B         LoRA gradients of layer i (freed after its update; in
                                               train_step_ort_api kept until the ort_training_step)
    embed.acc, head.mu, head.s, head.P, head.T accumulators of the chunked embedding and loss head
    loss                                       step output

Schedule entries:
    {"op": "fill", "tensor": NAME, "shape": [...], "dtype": "float32", "value": 0.0 | "-inf"}
    {"op": "call", "graph": GRAPH_ID, "layer": i | null, "inputs": {input: SOURCE}, "outputs": {output: NAME},
     "free": [NAME, ...], "memory": {...}}
    {"op": "ort_training_step", "lr": "lr", "gradients": [NAME, ...], "parameters": [NAME, ...], "free": [NAME, ...]}
SOURCE is a store NAME, a weight {"file": F, "tensor": T, "rows": [a, b]?}, a slice of a store tensor
{"tensor": NAME, "rows" | "cols": [a, b]}, or a constant {"value": [...], "dtype": D}. An output goes to a store
NAME, or into a slice {"tensor": NAME, "rows" | "cols": [a, b]} of a live tensor.

Split layers (`StepShapes.split_layers`: mesp with weights as inputs): layer i is the sub-layer calls of
`graphs.sublayer` (`_split_forward_layer`, `_split_backward_layer`), each reading its own weight rows; they
add the store names h.i (attention output, kept for the backward), z.i (MLP output, kept for a family with
an mlp_out norm), mlp.acc and mlp.dm (MLP block accumulators), dz and dh1.

Paged state (`bundle_format.PAGED`: x.*, lora.*, grad.*, optim.*): those store tensors live in files between
the calls that use them, so a call's planned memory counts as resident only the live tensors that are not
paged plus the paged ones it reads or writes (`store_bytes`); the other live paged tensors are `paged_bytes`.

Layer i runs its own program (`layer_program`): the shared `layer`, the one of its attention kind
(`layer_full` / `layer_sliding`, for a model with both), or `layer_XX` when its weights are baked in.

`train_step`: embedding (chunks) -> layers forward (keeping x.i) -> loss head (chunks, then finish:
loss and dy) -> for i = L-1..0: layer i backward (dy, grads; x.i freed) then layer i's optimizer
update right away (exact: no lower layer's backward reads layer i's LoRA tensors) and its grads freed.
`eval_loss`: the same forward with each x.i freed as soon as the next layer has run, and the loss.
`train_step_ort_api` (ONNX Runtime bundles): the same forward and backward, every layer's gradients
kept, then one `ort_training_step`: the gradients (in the training model's input order) go into ORT's
training API (`Module` then `Optimizer.step`), which updates the parameters it holds; the app copies
`parameters` back into its store (README, "ONNX Runtime training API").
"""
from __future__ import annotations

from dataclasses import dataclass, field

from exporter.bundle_format import (DTYPE_BYTES, EMBEDDING_FILE, FINAL_NORM_FILE, LM_HEAD_FILE,  # noqa: F401
                                    grad_of, grad_state_name, is_paged, layer_file, lora_state_name,
                                    peft_tensor_name)
from exporter.graph_defs import LayerPart, StepShapes, ident, matrix_input_name, summed_grads
from graphs import sublayer
from graphs.config import FULL, SLIDING, ModelSpec

def store_name(ref) -> str | None:
    """The store tensor a source or output target names (NAME, or a slice {"tensor": NAME, "rows" | "cols"}), if any."""
    if isinstance(ref, str):
        return ref
    return ref.get("tensor") if "file" not in ref else None


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def state_tensors(shapes: StepShapes) -> list[dict]:
    """Tensors that persist across steps: LoRA parameters (from the adapter) and optimizer state (zeros)."""
    state = []
    lora_shapes = shapes.lora.layer_lora_shapes(shapes.spec)
    for i in range(shapes.spec.num_layers):
        for name, shape in lora_shapes.items():
            state.append({"name": lora_state_name(i, name), "shape": list(shape), "dtype": "float32",
                          "init": {"adapter": peft_tensor_name(i, name)}})
        if shapes.optimizer == "adamw":
            state.append({"name": f"optim.{i}.step", "shape": [1], "dtype": "float32", "init": {"fill": 0.0}})
            for kind in ("exp_avg", "exp_avg_sq"):
                for name, shape in lora_shapes.items():
                    state.append({"name": f"optim.{i}.{kind}.{name}", "shape": list(shape), "dtype": "float32",
                                  "init": {"fill": 0.0}})
    return state


def step_inputs(shapes: StepShapes) -> list[dict]:
    return [{"name": "batch.input_ids", "shape": list(shapes.tokens), "dtype": "int64"},
            {"name": "batch.labels", "shape": list(shapes.tokens), "dtype": "int64"},
            {"name": "lr", "shape": [1], "dtype": "float32"}]


@dataclass
class _Builder:
    shapes: StepShapes
    graphs: dict[str, dict]  # graph id -> manifest entry (inputs, outputs, arena_bytes)
    baked: bool  # frozen layer weights inside per-layer programs (no weight inputs)
    entries: list[dict] = field(default_factory=list)
    live: dict[str, int] = field(default_factory=dict)  # store name -> bytes

    def fill(self, name: str, shape, value, dtype: str = "float32") -> None:
        self.entries.append({"op": "fill", "tensor": name, "shape": list(shape), "dtype": dtype, "value": value})
        self.live[name] = numel(shape) * DTYPE_BYTES[dtype]

    def call(self, graph: str, layer: int | None, inputs: dict, outputs: dict, free: list[str] = ()) -> None:
        entry = self.graphs[graph]
        declared = [t["name"] for t in entry["inputs"]]
        assert sorted(declared) == sorted(inputs), (graph, set(declared) ^ set(inputs))
        weight_bytes = sum(numel(t["shape"]) * DTYPE_BYTES[t["dtype"]] for t in entry["inputs"]
                           if isinstance(inputs[t["name"]], dict) and "file" in inputs[t["name"]])
        weight_bytes += entry.get("constant_bytes", 0)
        for t in entry["outputs"]:
            target = outputs[t["name"]]
            if isinstance(target, str):
                self.live[target] = numel(t["shape"]) * DTYPE_BYTES[t["dtype"]]
            else:  # a slice of a live tensor
                assert target["tensor"] in self.live, (graph, target)
        touched = {store_name(v) for v in [*inputs.values(), *outputs.values()] if store_name(v) is not None}
        store = sum(n for name, n in self.live.items() if name in touched or not is_paged(name))  # resident
        paged = sum(self.live.values()) - store  # in page files during this call
        arena = entry.get("arena_bytes")
        self.entries.append({
            "op": "call", "graph": graph, "layer": layer, "inputs": inputs,
            "outputs": {t["name"]: outputs[t["name"]] for t in entry["outputs"]}, "free": list(free),
            "memory": {"weights_bytes": weight_bytes, "arena_bytes": arena, "store_bytes": store,
                       "paged_bytes": paged, "planned_bytes": weight_bytes + (arena or 0) + store},
        })
        for name in free:
            self.live.pop(name, None)

    def ort_training_step(self, gradients: list[str], parameters: list[str]) -> None:
        self.entries.append({"op": "ort_training_step", "lr": "lr", "gradients": list(gradients),
                             "parameters": list(parameters), "free": list(gradients)})
        for name in gradients:
            self.live.pop(name, None)


def _layer_inputs(shapes: StepShapes, i: int, baked: bool) -> dict:
    inputs = {} if baked else {ident(n): {"file": layer_file(i), "tensor": n} for n in shapes.layer_stored()}
    inputs.update({ident(n): lora_state_name(i, n) for n in shapes.lora_names()})
    return inputs


def _matrix_sources(shapes: StepShapes, file: str, c: int) -> dict:
    """The embedding / LM-head inputs of vocabulary chunk c: rows [c C, (c + 1) C) of each stored tensor
    (`weight`, or `qweight`, `scales`, `zeros`), under the graphs' input names (`graph_defs.matrix_inputs`)."""
    rows = [c * shapes.chunk_rows, (c + 1) * shapes.chunk_rows]
    return {matrix_input_name(n): {"file": file, "tensor": n, "rows": rows}
            for n in shapes.matrix_stored(shapes.chunk_rows)}


def _forward(b: _Builder, keep_layer_inputs: bool) -> None:
    s = b.shapes
    rows, L = s.chunk_rows, s.spec.num_layers
    head_file = EMBEDDING_FILE if s.spec.tie_word_embeddings else LM_HEAD_FILE
    b.fill("embed.acc", s.hidden, 0.0)
    for c in range(s.num_chunks):
        last = c == s.num_chunks - 1
        b.call("embed.embed_chunk", None,
               {"input_ids": "batch.input_ids", **_matrix_sources(s, EMBEDDING_FILE, c),
                "offset": {"value": [c * rows], "dtype": "int64"}, "acc": "embed.acc"},
               {"acc_out": "x.0" if last else "embed.acc"}, ["embed.acc"] if last else [])
    for i in range(L):
        if s.split_layers:
            _split_forward_layer(b, i, keep_layer_inputs)
            continue
        b.call(layer_graph_id(s.spec, "layer_forward", i, b.baked), i, {"x": f"x.{i}", **_layer_inputs(s, i, b.baked)},
               {"y": f"x.{i + 1}"}, [] if keep_layer_inputs else [f"x.{i}"])
    for name, value in (("mu", "-inf"), ("s", 0.0), ("P", 0.0), ("T", 0.0)):
        b.fill(f"head.{name}", s.tokens if name in ("mu", "s") else s.hidden, value)
    norm = {"file": FINAL_NORM_FILE, "tensor": "weight"}
    state = {k: f"head.{k}" for k in ("mu", "s", "P", "T")}
    for c in range(s.num_chunks):
        b.call("head.head_chunk", None,
               {"x": f"x.{L}", "norm_weight": norm, "labels": "batch.labels",
                **_matrix_sources(s, head_file, c),
                "offset": {"value": [c * rows], "dtype": "int64"}, **state},
               {f"{k}_out": v for k, v in state.items()})
    b.call("head.head_finish", None, {"x": f"x.{L}", "norm_weight": norm, "labels": "batch.labels", **state},
           {"loss": "loss", "dx": "dy"}, [*state.values(), f"x.{L}"])


ATTENTION_PROGRAM = {FULL: "layer_full", SLIDING: "layer_sliding"}


def layer_program(spec: ModelSpec, i: int, baked: bool) -> str:
    """The program that runs layer i: `layer_XX` per layer when weights are baked in; otherwise one shared
    `layer` program, or one per attention kind (`layer_full`, `layer_sliding`) when the layers differ."""
    if baked:
        return f"layer_{i:02d}"
    return "layer" if len(spec.attention_kinds) == 1 else ATTENTION_PROGRAM[spec.layer_types[i]]


def layer_graph_id(spec: ModelSpec, kind: str, i: int, baked: bool) -> str:
    return f"{layer_program(spec, i, baked)}.{kind}"


def _builder(shapes: StepShapes, graphs: dict[str, dict], baked_layers: bool) -> _Builder:
    b = _Builder(shapes, graphs, baked_layers)
    for t in state_tensors(shapes) + step_inputs(shapes):
        b.live[t["name"]] = numel(t["shape"]) * DTYPE_BYTES[t["dtype"]]
    return b


def _part_inputs(s: StepShapes, part: LayerPart, i: int, block: tuple[int, int] | None = None) -> dict:
    """The sources of a sub-layer graph's frozen and LoRA inputs for layer i (MLP block [a, b): its rows)."""
    inputs = {}
    for n in part.stored:
        rows = None if block is None else s.block_rows(n, *block)
        inputs[ident(n)] = {"file": layer_file(i), "tensor": n, **({"rows": rows} if rows else {})}
    for n in part.lora:
        inputs[ident(n)] = _lora_slice(lora_state_name(i, n), n, block)
    return inputs


def _lora_slice(store: str, name: str, block: tuple[int, int] | None):
    """Store tensor `store` (LoRA tensor or gradient `name` of a layer), or block [a, b)'s rows / columns of it."""
    if block is not None and name in sublayer.ROW_BLOCKED_LORA:
        return {"tensor": store, "rows": list(block)}
    if block is not None and name in sublayer.COL_BLOCKED_LORA:
        return {"tensor": store, "cols": list(block)}
    return store


def _sub_id(b: _Builder, kind: str, i: int) -> str:
    return layer_graph_id(b.shapes.spec, kind, i, False)


def _split_forward_layer(b: _Builder, i: int, keep: bool) -> None:
    """Layer i as sub-layer calls (`graphs.sublayer`): attention (h.i), the MLP blocks into an accumulator, the
    finish (x.{i+1}). Training keeps h.i (and z.i, for an mlp_out norm) for the backward."""
    s = b.shapes
    attn, block, out = LayerPart(s, "attention"), LayerPart(s, "mlp_block"), LayerPart(s, "mlp_out")
    acc = f"z.{i}" if keep and s.family.norm("mlp_out") is not None else "mlp.acc"
    b.call(_sub_id(b, "attn_forward", i), i, {"x": f"x.{i}", **_part_inputs(s, attn, i)}, {"h1": f"h.{i}"},
           [] if keep else [f"x.{i}"])
    b.fill(acc, s.hidden, 0.0)
    for bounds in s.mlp_bounds():
        b.call(_sub_id(b, "mlp_block_forward", i), i, {"h1": f"h.{i}", "acc": acc, **_part_inputs(s, block, i, bounds)},
               {"acc_out": acc})
    b.call(_sub_id(b, "mlp_finish", i), i, {"h1": f"h.{i}", "acc": acc, **_part_inputs(s, out, i)},
           {"y": f"x.{i + 1}"}, ([] if acc != "mlp.acc" else [acc]) + ([] if keep else [f"h.{i}"]))


def _split_backward_layer(b: _Builder, i: int) -> None:
    """Layer i's backward as sub-layer calls: [dz from z.i], the MLP blocks (dm and the MLP LoRA gradients), dh1,
    then the attention backward (dy, the attention LoRA gradients); x.i and h.i freed."""
    s = b.shapes
    attn, block = LayerPart(s, "attention"), LayerPart(s, "mlp_block")
    out, mlp_in = LayerPart(s, "mlp_out"), LayerPart(s, "mlp_in")
    dz = "dy"
    if s.family.norm("mlp_out") is not None:
        dz = "dz"
        b.call(_sub_id(b, "mlp_out_backward", i), i, {"acc": f"z.{i}", "dy": "dy", **_part_inputs(s, out, i)},
               {"dz": dz}, [f"z.{i}"])
    b.fill("mlp.dm", s.hidden, 0.0)
    full = s.lora.layer_lora_shapes(s.spec)
    for n in block.lora:
        b.fill(grad_state_name(i, n), full[n], 0.0)
    summed = summed_grads(block)
    for bounds in s.mlp_bounds():
        b.call(_sub_id(b, "mlp_block_backward", i), i,
               {"h1": f"h.{i}", "dz": dz, "dm": "mlp.dm", **_part_inputs(s, block, i, bounds),
                **{f"gacc_{ident(n)}": grad_state_name(i, n) for n in summed}},
               {"dm_out": "mlp.dm", **{f"grad_{ident(n)}": _lora_slice(grad_state_name(i, n), n, bounds)
                                       for n in block.lora}})
    b.call(_sub_id(b, "mlp_backward_finish", i), i,
           {"h1": f"h.{i}", "dm": "mlp.dm", "dy": "dy", **_part_inputs(s, mlp_in, i)}, {"dh1": "dh1"},
           [f"h.{i}", "mlp.dm"] + (["dz"] if dz != "dy" else []))
    b.call(_sub_id(b, "attn_backward", i), i, {"x": f"x.{i}", "dh1": "dh1", **_part_inputs(s, attn, i)},
           {"dx": "dy", **{f"grad_{ident(n)}": grad_state_name(i, n) for n in attn.lora}}, [f"x.{i}", "dh1"])


def _backward_layer(b: _Builder, i: int) -> None:
    """Layer i's backward: dy and layer i's LoRA gradients; x.i freed."""
    if b.shapes.split_layers:
        return _split_backward_layer(b, i)
    grads = {f"grad_{ident(n)}": grad_state_name(i, n) for n in b.shapes.lora_names()}
    b.call(layer_graph_id(b.shapes.spec, "layer_backward", i, b.baked), i, {"x": f"x.{i}", "dy": "dy", **_layer_inputs(b.shapes, i, b.baked)},
           {"dx": "dy", **grads}, [f"x.{i}"])


def build_schedules(shapes: StepShapes, graphs: dict[str, dict], baked_layers: bool) -> dict[str, list[dict]]:
    """{"train_step": [...], "eval_loss": [...]} for graphs named `<program>.<kind>` (see module docstring)."""
    train = _builder(shapes, graphs, baked_layers)
    _forward(train, keep_layer_inputs=True)
    names = shapes.lora_names()
    for i in reversed(range(shapes.spec.num_layers)):
        _backward_layer(train, i)
        params = {f"param_{ident(n)}": lora_state_name(i, n) for n in names}
        news = {f"new_{ident(n)}": lora_state_name(i, n) for n in names}
        opt_in = {"lr": "lr", **params, **{f"grad_{ident(n)}": grad_state_name(i, n) for n in names}}
        if shapes.optimizer == "adamw":
            for kind in ("exp_avg", "exp_avg_sq"):
                opt_in.update({f"{kind}_{ident(n)}": f"optim.{i}.{kind}.{n}" for n in names})
                news.update({f"new_{kind}_{ident(n)}": f"optim.{i}.{kind}.{n}" for n in names})
            opt_in["step"] = f"optim.{i}.step"
            news["step_out"] = f"optim.{i}.step"
        train.call("optimizer.optimizer", i, opt_in, news, [grad_state_name(i, n) for n in names])
    train.entries[-1]["free"].append("dy")

    evaluate = _builder(shapes, graphs, baked_layers)
    _forward(evaluate, keep_layer_inputs=False)
    evaluate.entries[-1]["free"].append("dy")
    return {"train_step": train.entries, "eval_loss": evaluate.entries}


def ort_api_schedule(shapes: StepShapes, graphs: dict[str, dict], parameters: list[str]) -> list[dict]:
    """`train_step_ort_api`: forward, loss, every layer's backward with its gradients kept, then one
    `ort_training_step` over `parameters` (ORT's checkpoint order; gradients in the same order)."""
    b = _builder(shapes, graphs, False)
    _forward(b, keep_layer_inputs=True)
    for i in reversed(range(shapes.spec.num_layers)):
        _backward_layer(b, i)
    b.entries[-1]["free"].append("dy")
    b.live.pop("dy", None)
    b.ort_training_step([grad_of(p) for p in parameters], parameters)
    return b.entries


def peak_memory(schedule: list[dict]) -> dict:
    """The call with the largest planned bytes (weights + arena + live store)."""
    calls = [(k, e) for k, e in enumerate(schedule) if e["op"] == "call"]
    k, e = max(calls, key=lambda ke: ke[1]["memory"]["planned_bytes"])
    return {"peak_planned_bytes": e["memory"]["planned_bytes"], "peak_call_index": k, "peak_call_graph": e["graph"]}
