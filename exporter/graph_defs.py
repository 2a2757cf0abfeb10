"""The subgraphs of one training step, as `torch.nn.Module`s with flat, named tensor inputs.

Every backend lowers the same `GraphDef`s; only the file format differs. Graph kinds:

    embed_chunk     (input_ids, weight, offset, acc)                    -> (acc_out,)   (rows times the
                                                                            family's embedding scale)
    layer_forward   (x, [frozen weights], lora...)                      -> (y,)
    layer_backward  (x, dy, [frozen weights], lora...)                  -> (dx, grad_<lora>...)
    split layers (`StepShapes.split_layers`, `sublayer_graphs`; weights always inputs, an MLP block's sliced):
    attn_forward        (x, [attention weights], attention lora...)             -> (h1,)
    mlp_block_forward   (h1, acc, [block weights], block lora...)               -> (acc_out,)
    mlp_finish          (h1, acc, [mlp_out norm, down bias])                    -> (y,)
    mlp_out_backward    (acc, dy, [mlp_out norm, down bias])                    -> (dz,)  (family with an mlp_out norm)
    mlp_block_backward  (h1, dz, dm, [block weights], block lora..., gacc_<summed>...) -> (dm_out, grad_<mlp lora>...)
    mlp_backward_finish (h1, dm, dy, [mlp_in norm])                             -> (dh1,)
    attn_backward       (x, dh1, [attention weights], attention lora...)        -> (dx, grad_<attention lora>...)
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
from graphs import sublayer
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


TRANSPOSED = ".T"  # suffix of a stored tensor kept transposed (`StepShapes.layer_stored`)


def column_blocked(stored: str) -> bool:
    """A stored tensor of the down projection's matrix (weight, or qweight / scales / zeros): MLP blocks read its
    columns, so a split bundle stores it transposed."""
    return stored.startswith("mlp.down_proj.") and stored != "mlp.down_proj.bias"


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
    # mesp layers as sub-layer calls (`graphs.sublayer`: the attention, then `mlp_blocks` MLP channel blocks),
    # each reading only its weights; False: one call per layer (mebp, and Core ML's weights baked per layer)
    split_layers: bool = False

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
        """A layer's frozen tensors as the bundle stores them: name -> (shape, dtype). In a split bundle the
        down projection's tensors are stored transposed (`<name>.T`), so that an MLP block's columns are
        rows of the file (`column_blocked`)."""
        return self.stored(self.spec.layer_weight_shapes())

    def stored(self, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple, str]]:
        """Frozen tensors (Hugging Face name -> float shape) as stored, in a layer file or a graph's inputs."""
        out = {}
        for name, (shape, dtype) in quant.stored_tensors(weight_shapes, self.quant).items():
            name, transposed = self.as_stored(name)
            out[name] = (tuple(reversed(shape)) if transposed else shape, dtype)
        return out

    def as_stored(self, name: str) -> tuple[str, bool]:
        """(its name as stored, whether it is stored transposed) of a stored tensor (`quant.stored_tensors`' names):
        a split bundle keeps the down projection's tensors transposed as `<name>.T` (`column_blocked`)."""
        transposed = self.split_layers and column_blocked(name)
        return (name + TRANSPOSED if transposed else name), transposed

    @property
    def mlp_block_rows(self) -> int:
        """Intermediate channels per MLP block call: I / n for the smallest n >= `mlp_blocks` (at most one block
        per alignment unit) whose blocks are equal and start on a quantization group (so one graph serves
        every block and its rows of the stored tensors are whole groups)."""
        I = self.spec.intermediate_size
        align = 1 if self.quant is None else (self.quant.group_size or self.quant.per_byte)
        units = I // align
        n = next(d for d in range(min(self.mlp_blocks, units), units + 1) if units % d == 0)
        return I // n

    def mlp_bounds(self) -> list[tuple[int, int]]:
        """[a, b) of every MLP block call."""
        c = self.mlp_block_rows
        return [(a, a + c) for a in range(0, self.spec.intermediate_size, c)]

    def block_rows(self, stored: str, a: int, b: int) -> list[int] | None:
        """The rows of stored layer tensor `stored` that MLP block [a, b) reads (None: the whole tensor)."""
        if not stored.startswith("mlp.") or stored == "mlp.down_proj.bias":
            return None  # norms, the down bias (read whole by the finishing calls)
        if not column_blocked(stored):
            return [a, b]  # gate / up: rows are intermediate channels
        if self.quant is None or stored.endswith(f".qweight{TRANSPOSED}"):
            per = 1 if self.quant is None else self.quant.per_byte  # down^T: rows are columns (int4: two per byte)
            return [a // per, b // per]
        if not self.quant.group_size:
            return None  # one group per row: every block reads the row's one scale and zero
        return [a // self.quant.group_size, b // self.quant.group_size]

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


# ----------------------------------------------------------------------------- sub-layer calls (split layers)

def _attention_weight(name: str, fam: Family) -> bool:
    return name.startswith("self_attn.") or name in {fam.norm(r) for r in ("attn_in", "attn_out", "q", "k")}


class LayerPart:
    """The frozen tensors and LoRA tensors one sub-layer graph reads, by Hugging Face name with the graph's
    (block-sized) float shapes; `stored` is how they arrive as inputs (`StepShapes.stored`)."""

    def __init__(self, shapes: StepShapes, part: str):
        s, fam = shapes, shapes.family
        layer = s.spec.layer_weight_shapes()
        lora = s.lora.layer_lora_shapes(s.spec)
        c, H = s.mlp_block_rows, s.spec.hidden_size
        mlp_in, mlp_out = fam.norm("mlp_in"), fam.norm("mlp_out")
        if part == "attention":
            self.weights = {n: sh for n, sh in layer.items() if _attention_weight(n, fam)}
            self.lora = {n: sh for n, sh in lora.items() if n.startswith("self_attn.")}
        elif part == "mlp_block":
            self.weights = {n: ((c,) + tuple(sh[1:]) if n.startswith(("mlp.gate_proj.", "mlp.up_proj.")) else sh)
                            for n, sh in layer.items() if n.startswith(("mlp.gate_proj.", "mlp.up_proj."))}
            self.weights["mlp.down_proj.weight"] = (H, c)
            self.weights[mlp_in] = layer[mlp_in]
            rows, cols = sublayer.ROW_BLOCKED_LORA, sublayer.COL_BLOCKED_LORA
            self.lora = {n: ((c, sh[1]) if n in rows else (sh[0], c) if n in cols else sh)
                         for n, sh in lora.items() if n.startswith("mlp.")}
        elif part == "mlp_out":  # the finishing calls: mlp_out norm and down bias, where the family has them
            self.weights = {n: layer[n] for n in (mlp_out, "mlp.down_proj.bias") if n in layer}
            self.lora = {}
        elif part == "mlp_in":
            self.weights, self.lora = {mlp_in: layer[mlp_in]}, {}
        else:
            raise ValueError(part)
        self.stored = shapes.stored(self.weights)
        self.fmt = shapes.quant

    def inputs(self) -> list[TensorSpec]:
        return ([TensorSpec(ident(n), sh, d) for n, (sh, d) in self.stored.items()]
                + [TensorSpec(ident(n), sh) for n, sh in self.lora.items()])

    def split(self, args: tuple[Tensor, ...]) -> tuple[dict, dict[str, Tensor], tuple[Tensor, ...]]:
        """args = (stored..., lora..., rest...) -> (weights for the layer math, lora, rest)."""
        k, n = len(self.stored), len(self.stored) + len(self.lora)
        stored = {name.removesuffix(TRANSPOSED): (t.T if name.endswith(TRANSPOSED) else t)
                  for name, t in zip(self.stored, args[:k])}
        weights = quant.assemble(stored, list(self.weights), self.weights, self.fmt)
        return weights, dict(zip(self.lora, args[k:n])), args[n:]


class _SubLayer(torch.nn.Module):
    def __init__(self, shapes: StepShapes, part: str, attention: str):
        super().__init__()
        self.s, self.attention, self.part = shapes, attention, LayerPart(shapes, part)


class AttentionForward(_SubLayer):
    def forward(self, x, *rest):
        W, lora, _ = self.part.split(rest)
        s = self.s
        return (sublayer.attention_forward(x, W, lora, s.spec, s.lora.scale, self.attention, s.query_rows),)


class AttentionBackward(_SubLayer):
    def forward(self, x, dh1, *rest):
        W, lora, _ = self.part.split(rest)
        s = self.s
        dx, grads = sublayer.attention_backward(x, dh1, W, lora, s.spec, s.lora.scale, self.attention, s.query_rows)
        return (dx, *[grads[n] for n in self.part.lora])


class MlpBlockForward(_SubLayer):
    def forward(self, h1, acc, *rest):
        W, lora, _ = self.part.split(rest)
        return (acc + sublayer.mlp_block_forward(h1, W, lora, self.s.spec, self.s.lora.scale, self.attention),)


class MlpBlockBackward(_SubLayer):
    """(h1, dz, dm, weights..., lora..., gacc_<summed gradient>...) -> (dm_out, grad_<every MLP LoRA tensor>...):
    the summed gradients (gate / up lora_A, down lora_B) added to their accumulators, the block-owned ones
    (`sublayer.ROW_BLOCKED_LORA`, `sublayer.COL_BLOCKED_LORA`) the block's slice alone."""

    def forward(self, h1, dz, dm, *rest):
        W, lora, acc = self.part.split(rest)
        dm_J, grads = sublayer.mlp_block_backward(h1, dz, W, lora, self.s.spec, self.s.lora.scale, self.attention)
        acc = dict(zip(summed_grads(self.part), acc))
        return (dm + dm_J, *[grads[n] + acc[n] if n in acc else grads[n] for n in self.part.lora])


class MlpFinish(_SubLayer):
    def forward(self, h1, acc, *rest):
        W, _, _ = self.part.split(rest)
        return (sublayer.mlp_finish(h1, acc, W, self.s.spec, self.attention),)


class MlpOutBackward(_SubLayer):
    def forward(self, acc, dy, *rest):
        W, _, _ = self.part.split(rest)
        return (sublayer.mlp_out_backward(acc, dy, W, self.s.spec, self.attention),)


class MlpBackwardFinish(_SubLayer):
    def forward(self, h1, dm, dy, *rest):
        W, _, _ = self.part.split(rest)
        return (sublayer.mlp_backward_finish(h1, dm, dy, W, self.s.spec, self.attention),)


def summed_grads(part: LayerPart) -> list[str]:
    """The MLP LoRA tensors whose gradients are sums over the blocks (accumulated through the block calls)."""
    return [n for n in part.lora if n not in sublayer.ROW_BLOCKED_LORA + sublayer.COL_BLOCKED_LORA]


def sublayer_graphs(shapes: StepShapes, attention: str) -> list[GraphDef]:
    """The sub-layer graphs of layers of kind `attention` (`graphs.sublayer`; frozen weights as inputs):
    attn_forward, mlp_block_forward, mlp_finish, [mlp_out_backward], mlp_block_backward, mlp_backward_finish,
    attn_backward."""
    h = shapes.hidden
    X = [TensorSpec("x", h)]
    attn, block = LayerPart(shapes, "attention"), LayerPart(shapes, "mlp_block")
    out, mlp_in = LayerPart(shapes, "mlp_out"), LayerPart(shapes, "mlp_in")
    graphs = [
        GraphDef("attn_forward", AttentionForward(shapes, "attention", attention), [*X, *attn.inputs()],
                 [TensorSpec("h1", h)]),
        GraphDef("mlp_block_forward", MlpBlockForward(shapes, "mlp_block", attention),
                 [TensorSpec("h1", h), TensorSpec("acc", h), *block.inputs()], [TensorSpec("acc_out", h)]),
        GraphDef("mlp_finish", MlpFinish(shapes, "mlp_out", attention),
                 [TensorSpec("h1", h), TensorSpec("acc", h), *out.inputs()], [TensorSpec("y", h)]),
    ]
    if shapes.family.norm("mlp_out") is not None:
        graphs.append(GraphDef("mlp_out_backward", MlpOutBackward(shapes, "mlp_out", attention),
                               [TensorSpec("acc", h), TensorSpec("dy", h), *out.inputs()], [TensorSpec("dz", h)]))
    graphs += [
        GraphDef("mlp_block_backward", MlpBlockBackward(shapes, "mlp_block", attention),
                 [TensorSpec("h1", h), TensorSpec("dz", h), TensorSpec("dm", h), *block.inputs(),
                  *[TensorSpec("gacc_" + ident(n), block.lora[n]) for n in summed_grads(block)]],
                 [TensorSpec("dm_out", h), *[TensorSpec("grad_" + ident(n), sh) for n, sh in block.lora.items()]]),
        GraphDef("mlp_backward_finish", MlpBackwardFinish(shapes, "mlp_in", attention),
                 [TensorSpec("h1", h), TensorSpec("dm", h), TensorSpec("dy", h), *mlp_in.inputs()],
                 [TensorSpec("dh1", h)]),
        GraphDef("attn_backward", AttentionBackward(shapes, "attention", attention),
                 [*X, TensorSpec("dh1", h), *attn.inputs()],
                 [TensorSpec("dx", h), *[TensorSpec("grad_" + ident(n), sh) for n, sh in attn.lora.items()]]),
    ]
    return graphs


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
    """The graphs of layers of kind `attention`: the sub-layer graphs of a split bundle (`sublayer_graphs`), or
    the whole layer's forward and backward (weights baked in when given)."""
    if shapes.split_layers and weights is None:
        return sublayer_graphs(shapes, attention)
    return [layer_forward_graph(shapes, weights, attention), layer_backward_graph(shapes, weights, attention)]


def step_graphs(shapes: StepShapes) -> list[GraphDef]:
    """The shared (weights-as-inputs) graphs of one training step, in schedule order (layers: each kind)."""
    layers = [g for kind in shapes.spec.attention_kinds for g in layer_graphs(shapes, kind)]
    return [embed_chunk_graph(shapes), *layers, head_chunk_graph(shapes), head_finish_graph(shapes),
            optimizer_graph(shapes)]
