"""One decoder layer as sub-layer calls: the attention, then the MLP in blocks of intermediate channels.

Each call holds the frozen weights of one piece of the layer. With J a block of intermediate channels
(rows J of gate and up, columns J of down) and z the MLP output before its bias and norm:

    forward    h1 = attention_forward(x)                          = x + N_attn_out(o_proj(attention(x)))
               z  = sum_J mlp_block_forward(h1)_J                  (accumulated over the blocks from zeros)
               y  = mlp_finish(h1, z)                              = h1 + N_mlp_out(z + b_down)
    backward   dz = mlp_out_backward(z, dy)                        = N_mlp_out'(z + b_down)^T dy
                                                                     (dz = dy where the family has no mlp_out norm)
               dm = sum_J mlp_block_backward(h1, dz)_J             (dm = d m, m = N_mlp_in(h1))
               dh1 = mlp_backward_finish(h1, dm, dy)               = dy + N_mlp_in'(h1)^T dm
               dx, attention LoRA grads = attention_backward(x, dh1)   (the attention forward recomputed)

Exact by linearity: z, dm and every LoRA gradient are sums over the blocks, or (dB_gate, dB_up rows J and
dA_down columns J) made by one block alone. A block's `weights` and `lora` hold its slices under the layer's
names: gate / up weight (and bias) rows J (|J|, H), down weight columns J (H, |J|), gate / up lora_B rows J
(|J|, r), down lora_A columns J (r, |J|); gate / up lora_A and down lora_B whole; the mlp_in norm whole.
`graphs.layer.decoder_layer_backward` runs the same steps inside one call.
"""
from __future__ import annotations

import torch

from graphs.config import ATTENTION_QUERY_ROWS, ModelSpec
from graphs.layer import _attention_backward, _attention_by_group, _Layer, _mlp_backward, _mlp_by_block

Tensor = torch.Tensor
ROW_BLOCKED_LORA = ("mlp.gate_proj.lora_B", "mlp.up_proj.lora_B")  # a block reads (and owns the gradient of) rows J
COL_BLOCKED_LORA = ("mlp.down_proj.lora_A",)  # columns J; the other MLP LoRA tensors whole (gradients: sums)


def attention_forward(x: Tensor, weights: dict, lora: dict[str, Tensor], spec: ModelSpec, scale: float,
                      attention: str | None = None, query_rows: int | None = ATTENTION_QUERY_ROWS) -> Tensor:
    """h1 = x + N_attn_out(o_proj(attention(N_attn_in(x)))).  x (B, S, H) -> h1 (B, S, H)."""
    L = _Layer(spec, weights, attention, x.shape[1], x.dtype, query_rows)
    return _attention_by_group(x, L, lora, scale)[0]


def attention_backward(x: Tensor, dh1: Tensor, weights: dict, lora: dict[str, Tensor], spec: ModelSpec,
                       scale: float, attention: str | None = None, query_rows: int | None = ATTENTION_QUERY_ROWS
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """(x, dh1) -> (dx, {attention LoRA name: gradient}), the attention forward recomputed from x."""
    L = _Layer(spec, weights, attention, x.shape[1], x.dtype, query_rows)
    return _attention_backward(x, dh1, L, lora, scale, _attention_by_group(x, L, lora, scale))


def mlp_block_forward(h1: Tensor, weights: dict, lora: dict[str, Tensor], spec: ModelSpec, scale: float,
                      attention: str | None = None) -> Tensor:
    """Block J's share of z: act(gate_J(m)) * up_J(m) through down's columns J, LoRA included, no bias.
    h1 (B, S, H) -> (B, S, H)."""
    L = _Layer(spec, weights, attention, h1.shape[1], h1.dtype)
    return _mlp_by_block(L.norm("mlp_in", h1), L, lora, scale, 1, bias=False)


def _biased(z: Tensor, weights: dict) -> Tensor:
    return z + weights["mlp.down_proj.bias"] if "mlp.down_proj.bias" in weights else z


def mlp_finish(h1: Tensor, z: Tensor, weights: dict, spec: ModelSpec, attention: str | None = None) -> Tensor:
    """y = h1 + N_mlp_out(z + b_down)."""
    L = _Layer(spec, weights, attention, h1.shape[1], h1.dtype)
    return h1 + L.norm("mlp_out", _biased(z, weights))


def mlp_out_backward(z: Tensor, dy: Tensor, weights: dict, spec: ModelSpec, attention: str | None = None) -> Tensor:
    """dz = N_mlp_out'(z + b_down)^T dy (a family with an mlp_out norm; without one dz = dy)."""
    L = _Layer(spec, weights, attention, z.shape[1], z.dtype)
    return L.norm_backward("mlp_out", _biased(z, weights), dy)


def mlp_block_backward(h1: Tensor, dz: Tensor, weights: dict, lora: dict[str, Tensor], spec: ModelSpec,
                       scale: float, attention: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Block J's share of dm and its LoRA gradients (gate / up lora_B rows J, down lora_A columns J; the
    gate / up lora_A and down lora_B gradients are this block's terms of their sums)."""
    L = _Layer(spec, weights, attention, h1.shape[1], h1.dtype)
    return _mlp_backward(h1, dz, L, lora, scale, 1)


def mlp_backward_finish(h1: Tensor, dm: Tensor, dy: Tensor, weights: dict, spec: ModelSpec,
                        attention: str | None = None) -> Tensor:
    """dh1 = dy + N_mlp_in'(h1)^T dm."""
    L = _Layer(spec, weights, attention, h1.shape[1], h1.dtype)
    return dy + L.norm_backward("mlp_in", h1, dm)


def block_tensors(weights: dict, lora: dict[str, Tensor], J: slice) -> tuple[dict, dict[str, Tensor]]:
    """The MLP weights and LoRA tensors that block J's calls read (the module docstring's slices), from a
    whole layer's: what a schedule hands each block call."""
    W = {n: w for n, w in weights.items() if n.startswith("mlp.") or not n.startswith("self_attn.")}
    for name in ("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias"):
        if name in W:
            W[name] = W[name][J]
    W["mlp.down_proj.weight"] = W["mlp.down_proj.weight"][:, J]
    out = {n: t[J] if n in ROW_BLOCKED_LORA else t[:, J] if n in COL_BLOCKED_LORA else t
           for n, t in lora.items() if n.startswith("mlp.")}
    return W, out
