"""The subgraphs of one training step, as `torch.nn.Module`s with flat, named tensor inputs.

Every backend lowers the same `GraphDef`s; only the file format differs. Graph kinds:

    embed_chunk     (input_ids, weight, offset, acc)                    -> (acc_out,)   (rows times the
                                                                            family's embedding scale)
    layer_forward   (x, [frozen weights], lora...)                      -> (y,)
    layer_backward  (x, dy, [frozen weights], lora...)                  -> (dx, grad_<lora>...)
    head_chunk      (x, norm_weight, labels, weight, offset, mu, s, P, T) -> (mu_out, s_out, P_out, T_out)
    head_finish     (x, norm_weight, labels, mu, s, P, T)               -> (loss, dx)
    optimizer       sgd:   (lr, param_<lora>..., grad_<lora>...)        -> (new_<lora>...)
                    adamw: (lr, step, param_..., grad_..., exp_avg_..., exp_avg_sq_...)
                           -> (new_..., new_exp_avg_..., new_exp_avg_sq_..., step_out)

Frozen layer weights are inputs when `weights` is None (one graph serves every layer of an attention
kind; ExecuTorch and ONNX Runtime) or constants baked into the graph when given (Core ML: one package
per layer). A layer graph is built for one attention kind (`spec.layer_types`: full or sliding), which
fixes its RoPE and mask; a model with both kinds has a layer program per kind.
Tensor names inside a layer use Hugging Face names with '.' replaced by '_' (`ident`).

Quantized weights (`StepShapes.quant`, see `graphs.quant`): each projection matrix is three tensors
`<module>_qweight` (uint8 codes), `<module>_scales`, `<module>_zeros` instead of `<module>_weight`, and
the embedding / LM-head chunk `weight` becomes `weight_qweight`, `weight_scales`, `weight_zeros`. The
graphs dequantize only the rows or columns each block reads (`graphs.quant.QuantizedWeight`); the loss
head reads its chunk `StepShapes.head_rows` rows at a time (online softmax over the sub-blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphs import head as head_math
from graphs import optim as optim_math
from graphs import layer as layer_math
from graphs import quant
from graphs.config import ATTENTION_QUERY_ROWS, MLP_BLOCKS, VOCAB_CHUNK_ROWS, LoraConfig, ModelSpec
from graphs.family import Family, get_family

Tensor = torch.Tensor
METHODS = ("mesp", "mebp")
OPTIMIZERS = ("sgd", "adamw")
# LM-head rows multiplied at once inside a head_chunk call (an online-softmax step per sub-block): for a
# quantized chunk always (it bounds the dequantized copy), for a float32 chunk where the backend asks
# (`StepShapes.head_block_rows`: ExecuTorch with XNNPACK, whose workspace keeps a packed copy of the
# right-hand matrix, 7.3 MB at hidden 896 instead of a whole chunk's 28.7 MB). ONNX Runtime copies every
# slice of an input, which made its float head 1.5x slower in blocks, so it multiplies the whole chunk.
# A quantized chunk's sub-blocks hold HEAD_BLOCK_LOGITS logits (tokens x rows: 1024 rows at 256 tokens,
# 256 at 1024), at least 128 and at most HEAD_BLOCK_ROWS rows, so the dequantized rows and the logits
# (the head's arena) stay the same size as the sequence grows (`StepShapes.head_rows`).
HEAD_BLOCK_ROWS = 2048
HEAD_BLOCK_LOGITS = 256 * 1024


def ident(name: str) -> str:
    """A Hugging Face tensor name as a graph input/output name: `self_attn.q_proj.weight` -> `self_attn_q_proj_weight`."""
    return name.replace(".", "_")


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def example(self) -> Tensor:
        if self.dtype == "int64":
            return torch.zeros(self.shape, dtype=torch.int64)
        if self.dtype == "uint8":
            return torch.randint(0, 256, self.shape, dtype=torch.uint8)
        return torch.randn(self.shape, dtype=torch.float32) * 0.02

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class GraphDef:
    """One traceable subgraph: `module(*inputs)` returns a tuple of tensors named `outputs`."""

    kind: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    constants: dict[str, Tensor] = field(default_factory=dict)  # frozen weights baked in (Core ML)

    def example_inputs(self) -> tuple[Tensor, ...]:
        return tuple(t.example() for t in self.inputs)

    def signature(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class StepShapes:
    """Everything that fixes the graphs' shapes and math."""

    spec: ModelSpec
    lora: LoraConfig
    method: str = "mesp"
    optimizer: str = "sgd"
    vocab_chunk_rows: int = VOCAB_CHUNK_ROWS
    mlp_blocks: int = MLP_BLOCKS
    quant: quant.QuantFormat | None = None  # None: float32 frozen weights
    # float32 LM-head rows multiplied at once in a head_chunk call (None: the whole chunk); a quantized
    # chunk is always read in sub-blocks (`head_rows`). The backend picks it (`Backend.head_block_rows`).
    head_block_rows: int | None = None
    query_rows: int | None = ATTENTION_QUERY_ROWS  # queries per attention block (mesp); None: all at once

    @property
    def head_rows(self) -> int | None:
        """LM-head rows multiplied at once in a head_chunk call (None: the whole chunk)."""
        if self.quant is None:
            return self.head_block_rows
        return max(128, min(HEAD_BLOCK_ROWS, HEAD_BLOCK_LOGITS // (self.lora.batch * self.lora.seq_len)))

    @property
    def chunk_rows(self) -> int:
        return head_math.vocab_chunks(self.spec.vocab_size, self.vocab_chunk_rows)[0]

    @property
    def num_chunks(self) -> int:
        return head_math.vocab_chunks(self.spec.vocab_size, self.vocab_chunk_rows)[1]

    @property
    def hidden(self) -> tuple[int, int, int]:
        return (self.lora.batch, self.lora.seq_len, self.spec.hidden_size)

    @property
    def tokens(self) -> tuple[int, int]:
        return (self.lora.batch, self.lora.seq_len)

    def lora_names(self) -> list[str]:
        return list(self.lora.layer_lora_shapes(self.spec))

    def layer_stored(self) -> dict[str, tuple[tuple, str]]:
        """A layer's frozen tensors as the bundle stores them: name -> (shape, dtype)."""
        return quant.stored_tensors(self.spec.layer_weight_shapes(), self.quant)

    def matrix_stored(self, rows: int) -> dict[str, tuple[tuple, str]]:
        """An embedding / LM-head block of `rows` rows as stored: {"weight"} or {"qweight", "scales", "zeros"}."""
        shape = (rows, self.spec.hidden_size)
        if self.quant is None:
            return {"weight": (shape, "float32")}
        return self.quant.stored_shapes(shape)

    @property
    def family(self) -> Family:
        return get_family(self.spec.family)


class _WeightsMixin(torch.nn.Module):
    """Holds a layer's frozen tensors as buffers (constants) or expects them as inputs; either way as the
    bundle stores them (`StepShapes.layer_stored`), assembled into the layer math's weights by `split`."""

    def __init__(self, shapes: StepShapes, weights: dict[str, Tensor] | None, attention: str | None = None):
        super().__init__()
        self.shapes = shapes
        self.attention = shapes.spec.attention_kind(attention)
        self.weight_shapes = shapes.spec.layer_weight_shapes()
        self.stored_names = list(shapes.layer_stored())
        self.baked = weights is not None
        if self.baked:
            for name in self.stored_names:
                self.register_buffer(ident(name), weights[name].contiguous(), persistent=True)

    def split(self, args: tuple[Tensor, ...]) -> tuple[dict, dict[str, Tensor]]:
        """args = ([stored weights if not baked], lora...) -> (weights, lora) dicts by Hugging Face name; a
        quantized matrix is a `graphs.quant.QuantizedWeight`."""
        if self.baked:
            stored = {n: getattr(self, ident(n)) for n in self.stored_names}
        else:
            stored, args = dict(zip(self.stored_names, args[:len(self.stored_names)])), args[len(self.stored_names):]
        weights = quant.assemble(stored, list(self.weight_shapes), self.weight_shapes, self.shapes.quant)
        if self.baked:  # constants: each matrix dequantized whole by one op that a converter can keep compressed
            from exporter.quant_op import dequantize

            weights = {n: dequantize(w.qweight, w.scales, w.zeros, w.fmt.bits)
                       if isinstance(w, quant.QuantizedWeight) else w for n, w in weights.items()}
        return weights, dict(zip(self.shapes.lora_names(), args))


def _matrix(parts: tuple[Tensor, ...], fmt: quant.QuantFormat | None):
    """An embedding / LM-head chunk from its graph inputs: the float rows, or a QuantizedWeight."""
    return parts[0] if fmt is None else quant.QuantizedWeight(*parts, fmt)


class EmbedChunk(torch.nn.Module):
    """acc + E_c[ids] (times sqrt(hidden) for a family that scales its embedding: exact, as each token's
    row comes from exactly one chunk and acc is zero there before)."""

    def __init__(self, shapes: StepShapes):
        super().__init__()
        self.scale_hidden = shapes.spec.hidden_size if shapes.family.scale_embedding else None
        self.fmt = shapes.quant

    def forward(self, input_ids, *rest):  # (input_ids, weight..., offset, acc)
        *weight, offset, acc = rest
        return (head_math.embed_chunk(input_ids, _matrix(weight, self.fmt), offset, acc, self.scale_hidden),)


class LayerForward(_WeightsMixin):
    """mesp: attention by kv group and MLP by channel block (same y, smaller arena); mebp: the plain layer."""

    def forward(self, x, *rest):
        weights, lora = self.split(rest)
        s = self.shapes
        if s.method == "mebp":
            return (layer_math.decoder_layer_forward(x, weights, lora, s.spec, s.lora.scale, self.attention),)
        return (layer_math.decoder_layer_forward_structured(x, weights, lora, s.spec, s.lora.scale, s.mlp_blocks,
                                                            self.attention, s.query_rows),)


class LayerBackward(_WeightsMixin):
    def forward(self, x, dy, *rest):
        weights, lora = self.split(rest)
        s = self.shapes
        if s.method == "mebp":
            dx, grads = layer_math.decoder_layer_backward_autodiff(x, dy, weights, lora, s.spec, s.lora.scale,
                                                                   self.attention)
        else:
            dx, grads = layer_math.decoder_layer_backward(x, dy, weights, lora, s.spec, s.lora.scale, s.mlp_blocks,
                                                          self.attention, s.query_rows)
        return (dx, *[grads[n] for n in s.lora_names()])


class AutodiffTraced(torch.nn.Module):
    """A module whose forward runs torch.autograd, flattened into a plain aten graph by `make_fx`.

    torch.export (non-strict) cannot trace `torch.autograd.grad` through ops whose backward reads their
    own output (rsqrt, softmax, exp): the saved output becomes a bogus lifted constant. make_fx traces
    what the autograd engine actually runs, and torch.export then sees only aten ops.
    """

    def __init__(self, inner: torch.nn.Module, example_inputs: tuple[Tensor, ...]):
        super().__init__()
        from torch._decomp import core_aten_decompositions
        from torch.fx.experimental.proxy_tensor import make_fx

        # Decompose backward-only ops (e.g. _softmax_backward_data) into core ATen, which every
        # runtime's kernel library covers.
        gm = make_fx(inner, decomposition_table=core_aten_decompositions(), tracing_mode="real")(*example_inputs)
        for node in list(gm.graph.nodes):  # aten.alias is a no-op that Core ML's converter rejects
            if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.recompile()
        self.graph_module = gm

    def forward(self, *args):
        return tuple(self.graph_module(*args))


class HeadChunk(torch.nn.Module):
    """One vocabulary chunk of the online-softmax loss head, folded in sub-blocks of rows where asked
    (`HEAD_BLOCK_ROWS`: the same online-softmax step per sub-block; a quantized sub-block is dequantized
    on its own)."""

    def __init__(self, shapes: StepShapes):
        super().__init__()
        self.eps, self.vocab = shapes.spec.rms_norm_eps, shapes.spec.vocab_size
        self.norm_offset = shapes.family.norm_offset
        self.fmt = shapes.quant
        self.block_rows = shapes.head_rows

    def forward(self, x, norm_weight, labels, *rest):  # (x, norm_weight, labels, weight..., offset, mu, s, P, T)
        *weight, offset, mu, s, P, T = rest
        w = _matrix(weight, self.fmt)
        state = (mu, s, P, T)
        rows, step = w.shape[0], self.block_rows or w.shape[0]
        for start in range(0, rows, step):
            # each sub-block read (sliced or dequantized) right before its step, so one exists at a time
            block = w if self.fmt is None and step >= rows else w[start:min(start + step, rows)]
            state = head_math.head_chunk(x, norm_weight, labels, block, offset + start if start else offset, *state,
                                         self.eps, self.vocab, self.norm_offset)
        return state


class HeadFinish(torch.nn.Module):
    def __init__(self, shapes: StepShapes):
        super().__init__()
        self.eps, self.norm_offset = shapes.spec.rms_norm_eps, shapes.family.norm_offset

    def forward(self, x, norm_weight, labels, mu, s, P, T):
        loss, dx = head_math.head_finish(x, norm_weight, labels, mu, s, P, T, self.eps, self.norm_offset)
        return loss.reshape(1), dx


class SgdUpdate(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, lr, *tensors):
        return tuple(optim_math.sgd_update(list(tensors[:self.n]), list(tensors[self.n:]), lr))


class AdamWUpdate(torch.nn.Module):
    def __init__(self, n: int, settings: optim_math.AdamWSettings):
        super().__init__()
        self.n, self.settings = n, settings

    def forward(self, lr, step, *tensors):
        n = self.n
        p, m, v, t = optim_math.adamw_update(list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:3 * n]),
                                             list(tensors[3 * n:]), lr, step, self.settings)
        return (*p, *m, *v, t)


def layer_weight_inputs(shapes: StepShapes) -> list[TensorSpec]:
    return [TensorSpec(ident(n), shape, dtype) for n, (shape, dtype) in shapes.layer_stored().items()]


def matrix_input_name(stored: str) -> str:
    """The graph input of an embedding / LM-head file's tensor: `weight`, or `weight_qweight`, ..."""
    return stored if stored == "weight" else f"weight_{stored}"


def matrix_inputs(shapes: StepShapes) -> list[TensorSpec]:
    """The inputs of one embedding / LM-head chunk: `weight`, or `weight_qweight`, `weight_scales`, `weight_zeros`."""
    stored = shapes.matrix_stored(shapes.chunk_rows)
    return [TensorSpec(matrix_input_name(n), shape, dtype) for n, (shape, dtype) in stored.items()]


def lora_inputs(shapes: StepShapes, prefix: str = "") -> list[TensorSpec]:
    return [TensorSpec(prefix + ident(n), s) for n, s in shapes.lora.layer_lora_shapes(shapes.spec).items()]


def embed_chunk_graph(shapes: StepShapes) -> GraphDef:
    return GraphDef("embed_chunk", EmbedChunk(shapes),
                    [TensorSpec("input_ids", shapes.tokens, "int64"), *matrix_inputs(shapes),
                     TensorSpec("offset", (1,), "int64"), TensorSpec("acc", shapes.hidden)],
                    [TensorSpec("acc_out", shapes.hidden)])


def layer_forward_graph(shapes: StepShapes, weights: dict[str, Tensor] | None = None,
                        attention: str | None = None) -> GraphDef:
    """`attention`: the layers' kind (None: the spec's only kind)."""
    frozen = [] if weights is not None else layer_weight_inputs(shapes)
    return GraphDef("layer_forward", LayerForward(shapes, weights, attention),
                    [TensorSpec("x", shapes.hidden), *frozen, *lora_inputs(shapes)],
                    [TensorSpec("y", shapes.hidden)], weights or {})


def layer_backward_graph(shapes: StepShapes, weights: dict[str, Tensor] | None = None,
                         attention: str | None = None) -> GraphDef:
    frozen = [] if weights is not None else layer_weight_inputs(shapes)
    graph = GraphDef("layer_backward", LayerBackward(shapes, weights, attention),
                     [TensorSpec("x", shapes.hidden), TensorSpec("dy", shapes.hidden), *frozen, *lora_inputs(shapes)],
                     [TensorSpec("dx", shapes.hidden), *lora_inputs(shapes, "grad_")], weights or {})
    if shapes.method == "mebp":
        graph.module = AutodiffTraced(graph.module, graph.example_inputs())
    return graph


def head_state_specs(shapes: StepShapes, suffix: str = "") -> list[TensorSpec]:
    return [TensorSpec("mu" + suffix, shapes.tokens), TensorSpec("s" + suffix, shapes.tokens),
            TensorSpec("P" + suffix, shapes.hidden), TensorSpec("T" + suffix, shapes.hidden)]


def head_chunk_graph(shapes: StepShapes) -> GraphDef:
    H = shapes.spec.hidden_size
    return GraphDef("head_chunk", HeadChunk(shapes),
                    [TensorSpec("x", shapes.hidden), TensorSpec("norm_weight", (H,)),
                     TensorSpec("labels", shapes.tokens, "int64"), *matrix_inputs(shapes),
                     TensorSpec("offset", (1,), "int64"), *head_state_specs(shapes)],
                    head_state_specs(shapes, "_out"))


def head_finish_graph(shapes: StepShapes) -> GraphDef:
    H = shapes.spec.hidden_size
    return GraphDef("head_finish", HeadFinish(shapes),
                    [TensorSpec("x", shapes.hidden), TensorSpec("norm_weight", (H,)),
                     TensorSpec("labels", shapes.tokens, "int64"), *head_state_specs(shapes)],
                    [TensorSpec("loss", (1,)), TensorSpec("dx", shapes.hidden)])


def optimizer_graph(shapes: StepShapes, settings: optim_math.AdamWSettings = optim_math.AdamWSettings()) -> GraphDef:
    n = len(shapes.lora_names())
    lr, step = TensorSpec("lr", (1,)), TensorSpec("step", (1,))
    params, grads = lora_inputs(shapes, "param_"), lora_inputs(shapes, "grad_")
    if shapes.optimizer == "sgd":
        return GraphDef("optimizer", SgdUpdate(n), [lr, *params, *grads], lora_inputs(shapes, "new_"))
    m, v = lora_inputs(shapes, "exp_avg_"), lora_inputs(shapes, "exp_avg_sq_")
    return GraphDef("optimizer", AdamWUpdate(n, settings), [lr, step, *params, *grads, *m, *v],
                    [*lora_inputs(shapes, "new_"), *lora_inputs(shapes, "new_exp_avg_"),
                     *lora_inputs(shapes, "new_exp_avg_sq_"), TensorSpec("step_out", (1,))])


def layer_graphs(shapes: StepShapes, attention: str, weights: dict[str, Tensor] | None = None) -> list[GraphDef]:
    """The forward and backward of layers of kind `attention` (weights baked in when given)."""
    return [layer_forward_graph(shapes, weights, attention), layer_backward_graph(shapes, weights, attention)]


def step_graphs(shapes: StepShapes) -> list[GraphDef]:
    """The shared (weights-as-inputs) graphs of one training step, in schedule order (layers: each kind)."""
    layers = [g for kind in shapes.spec.attention_kinds for g in layer_graphs(shapes, kind)]
    return [embed_chunk_graph(shapes), *layers, head_chunk_graph(shapes), head_finish_graph(shapes),
            optimizer_graph(shapes)]
