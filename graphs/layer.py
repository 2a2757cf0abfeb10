"""One decoder layer of any family with LoRA: forward, a backward derived by hand, and the autodiff backward.

The family (`graphs.family`, chosen by `spec.family`) says which norms, biases and activation the
layer has; the spec says the sizes and, per attention kind (`full_attention` / `sliding_attention`),
the RoPE and the window. Follows the Hugging Face decoder layers (eager attention) exactly:

    a  = N_attn_in(x)
    q, k, v = LoRALinear(a)   (+ bias where the family has one)
    q, k = RoPE(N_q(q)), RoPE(N_k(k))                     (q/k norms per head, where the family has them)
    o  = softmax(q k^T * query_scale + mask) v            (grouped-query: head h reads kv head h // g;
                                                            mask causal, or sliding: i - window < j <= i)
    h1 = x + N_attn_out(LoRALinear_o(o))
    m  = N_mlp_in(h1)
    y  = h1 + N_mlp_out(LoRALinear_down(act(LoRALinear_gate(m)) * LoRALinear_up(m)))

An absent norm is the identity; N(x) = x * rsqrt(mean(x^2) + eps) * (w + norm_offset).
Tensors: `weights` maps Hugging Face names relative to the layer (`self_attn.q_proj.weight`, ...) to
frozen tensors; `lora` maps `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r) for each adapted
module. Activations are (B, S, H). `attention` is the layer's kind; None means the spec's only kind.

`decoder_layer_backward` is the structured (MeSP) backward: its only saved activation is x; every
intermediate is recomputed from x inside it, attention one kv-head group and one block of queries at a
time (`graphs.config.ATTENTION_QUERY_ROWS`; a sliding layer one band of `window` queries at a time), the MLP one block of intermediate channels at a time, and
each LoRA `h = x A^T` is recomputed, never stored. `decoder_layer_backward_autodiff` is the per-layer
checkpointing (MeBP) baseline.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from graphs import ops
from graphs.config import ATTENTION_QUERY_ROWS, MLP_BLOCKS, ModelSpec
from graphs.family import Family, get_family

Tensor = torch.Tensor


def _lora_pair(lora: dict[str, Tensor], module: str) -> tuple[Tensor | None, Tensor | None]:
    return lora.get(f"{module}.lora_A"), lora.get(f"{module}.lora_B")


def _proj(x: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor], module: str, scale: float) -> Tensor:
    return ops.lora_linear(x, weights[f"{module}.weight"], weights.get(f"{module}.bias"), *_lora_pair(lora, module),
                           scale)


class _Layer:
    """What the layer functions read from the family and the spec, resolved once."""

    def __init__(self, spec: ModelSpec, weights: dict[str, Tensor], attention: str | None, seq_len: int,
                 dtype: torch.dtype, query_rows: int | None = None):
        self.spec, self.W, self.query_rows = spec, weights, query_rows
        self.fam: Family = get_family(spec.family)
        self.kind = spec.attention_kind(attention)
        self.eps, self.offset = spec.rms_norm_eps, self.fam.norm_offset
        self.nh, self.nkv, self.D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.g = self.nh // self.nkv
        self.qscale, self.window = spec.query_scale, spec.window(self.kind)
        self.seq_len, self.dtype = seq_len, dtype

    @functools.cached_property
    def rope(self) -> tuple[Tensor, Tensor]:
        """(cos, sin) of the layer's RoPE, made when first used (an MLP-only call has none)."""
        theta, scaling = self.spec.rope(self.kind)
        return ops.rope_cos_sin(self.seq_len, self.D, theta, self.dtype, scaling)

    def norm(self, role: str, x: Tensor) -> Tensor:
        name = self.fam.norm(role)
        return x if name is None else ops.rms_norm(x, self.W[name], self.eps, self.offset)

    def norm_backward(self, role: str, x: Tensor, dy: Tensor) -> Tensor:
        name = self.fam.norm(role)
        return dy if name is None else ops.rms_norm_backward(x, self.W[name], self.eps, dy, self.offset)

    def qk(self, role: str, t: Tensor) -> Tensor:
        """RoPE(N_role(t)) for heads t (B, n, S, D)."""
        return ops.apply_rope(self.norm(role, t), *self.rope)

    def qk_backward(self, role: str, t: Tensor, dy: Tensor) -> Tensor:
        return self.norm_backward(role, t, ops.apply_rope_backward(dy, *self.rope))


def decoder_layer_forward(x: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                          spec: ModelSpec, scale: float, attention: str | None = None) -> Tensor:
    """y = DecoderLayer(x) as in the module docstring.  x (B, S, H) -> y (B, S, H).

    Full attention over the (S, S) scores; a sliding layer shorter than S over its bands (`ops.attention_blocks`),
    so that the autodiff backward of this forward also stores O(S window) probabilities, not O(S^2)."""
    B, S, H = x.shape
    L = _Layer(spec, weights, attention, S, x.dtype)
    nh, nkv, D = L.nh, L.nkv, L.D

    a = L.norm("attn_in", x)
    q = _proj(a, weights, lora, "self_attn.q_proj", scale).view(B, S, nh, D).transpose(1, 2)  # (B, nh, S, D)
    k = _proj(a, weights, lora, "self_attn.k_proj", scale).view(B, S, nkv, D).transpose(1, 2)  # (B, nkv, S, D)
    v = _proj(a, weights, lora, "self_attn.v_proj", scale).view(B, S, nkv, D).transpose(1, 2)  # (B, nkv, S, D)
    q, k = L.qk("q", q), L.qk("k", k)
    if L.window is not None and L.window < S:  # sliding: band by band, so autodiff (MeBP) keeps O(S window)
        qg = q.reshape(B * nkv, L.g, S, D)  # (B*nkv, g, S, D): kv head j's g query heads
        o = ops.group_attention(qg, k.reshape(B * nkv, S, D), v.reshape(B * nkv, S, D), L.qscale, L.window)
        o = o.view(B, nh, S, D)
    else:
        o = ops.attention(q, k, v, L.qscale, L.window)
    o = o.transpose(1, 2).reshape(B, S, nh * D)  # (B, S, nh*D)
    h1 = x + L.norm("attn_out", _proj(o, weights, lora, "self_attn.o_proj", scale))

    m = L.norm("mlp_in", h1)
    act = ops.glu(_proj(m, weights, lora, "mlp.gate_proj", scale), _proj(m, weights, lora, "mlp.up_proj", scale),
                  L.fam.activation)
    return h1 + L.norm("mlp_out", _proj(act, weights, lora, "mlp.down_proj", scale))


def _attention_by_group(x: Tensor, L: _Layer, lora: dict[str, Tensor], scale: float):
    """(h1, attn, q/k/v row-block projections, raw q per group (B, g, S, D), raw k and v per group (B, S, D)).

    h1 = x + N_attn_out(attn), attn = o_proj(attention(N_attn_in(x))), computed one kv-head group at a
    time: group j owns q rows Jq = [j*g*D, (j+1)*g*D) and k/v rows Jk = [j*D, (j+1)*D); its probabilities
    and output exist only inside the loop (and, for a sliding layer, one band at a time). q and k are
    kept as projected (before their norm and RoPE, which the backward recomputes)."""
    W, g, D = L.W, L.g, L.D
    a = L.norm("attn_in", x)
    proj = {name: ops.RowBlockLora(a, W[f"self_attn.{name}_proj.weight"], W.get(f"self_attn.{name}_proj.bias"),
                                   *_lora_pair(lora, f"self_attn.{name}_proj"), scale) for name in ("q", "k", "v")}
    Ao, Bo = _lora_pair(lora, "self_attn.o_proj")
    qs, ks, vs = [], [], []
    o_out = ho = None
    for j in range(L.nkv):
        Jq, Jk = slice(j * g * D, (j + 1) * g * D), slice(j * D, (j + 1) * D)
        q = ops.split_heads(proj["q"].forward(Jq), g, D)  # (B, g, S, D)
        k = ops.split_heads(proj["k"].forward(Jk), 1, D)  # (B, 1, S, D)
        v = ops.split_heads(proj["v"].forward(Jk), 1, D)[:, 0]  # (B, S, D)
        o = ops.merge_heads(ops.group_attention(L.qk("q", q), L.qk("k", k)[:, 0], v, L.qscale, L.window,
                                                L.query_rows))
        part = F.linear(o, W["self_attn.o_proj.weight"][:, Jq])  # o (B, S, g*D); as linear: no transposed copy
        o_out = part if o_out is None else o_out + part
        if Ao is not None:
            hpart = o @ Ao[:, Jq].T
            ho = hpart if ho is None else ho + hpart
        qs.append(q), ks.append(k), vs.append(v)
        del o, part
    if Ao is not None:
        o_out = o_out + scale * (ho @ Bo.T)
    return x + L.norm("attn_out", o_out), o_out, proj, qs, ks, vs


def _mlp_by_block(m: Tensor, L: _Layer, lora: dict[str, Tensor], scale: float, mlp_blocks: int,
                  bias: bool = True) -> Tensor:
    """down(act(gate(m)) * up(m)), one block J of intermediate channels at a time:
    sum_J act_J Wd[:, J]^T + s (sum_J act_J Ad[:, J]^T) Bd^T (+ the down bias when `bias`)."""
    W = L.W
    gate = ops.RowBlockLora(m, W["mlp.gate_proj.weight"], W.get("mlp.gate_proj.bias"),
                            *_lora_pair(lora, "mlp.gate_proj"), scale)
    up = ops.RowBlockLora(m, W["mlp.up_proj.weight"], W.get("mlp.up_proj.bias"), *_lora_pair(lora, "mlp.up_proj"),
                          scale)
    Wd = W["mlp.down_proj.weight"]
    Ad, Bd = _lora_pair(lora, "mlp.down_proj")
    out = hd = None
    for J in ops.blocks(W["mlp.gate_proj.weight"].shape[0], mlp_blocks):
        act = ops.glu(gate.forward(J), up.forward(J), L.fam.activation)  # (B, S, |J|)
        part = act @ ops.cols(Wd, J).T
        out = part if out is None else out + part
        if Ad is not None:
            hpart = act @ ops.cols(Ad, J).T
            hd = hpart if hd is None else hd + hpart
        del act, part
    if Ad is not None:
        out = out + scale * (hd @ Bd.T)
    if bias and "mlp.down_proj.bias" in W:
        out = out + W["mlp.down_proj.bias"]
    return out


def decoder_layer_forward_structured(x: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                                     spec: ModelSpec, scale: float, mlp_blocks: int = MLP_BLOCKS,
                                     attention: str | None = None, query_rows: int | None = ATTENTION_QUERY_ROWS
                                     ) -> Tensor:
    """The same y as `decoder_layer_forward`, with attention one kv group and one block of `query_rows` queries
    (`ops.attention_blocks`) and the MLP one channel block at a time, so no (B, nh, S, S), (S, S) or (B, S, I)
    tensor exists at once."""
    L = _Layer(spec, weights, attention, x.shape[1], x.dtype, query_rows)
    h1 = _attention_by_group(x, L, lora, scale)[0]
    return h1 + L.norm("mlp_out", _mlp_by_block(L.norm("mlp_in", h1), L, lora, scale, mlp_blocks))


def decoder_layer_backward(x: Tensor, dy: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                           spec: ModelSpec, scale: float, mlp_blocks: int = MLP_BLOCKS, attention: str | None = None,
                           query_rows: int | None = ATTENTION_QUERY_ROWS) -> tuple[Tensor, dict[str, Tensor]]:
    """Structured backward of one decoder layer: (x, dy) -> (dx, {lora name: gradient}).

    Recomputes the forward from x and differentiates it by hand:
      1. attention forward one kv group at a time, keeping only the projected q, k, v, the o_proj
         output and a = N_attn_in(x): h1 = x + N_attn_out(o_proj(o)); p and o are released per group;
      2. MLP: with an output norm (Gemma) a forward pass over the channel blocks gives z = down(...) and
         dz = N_mlp_out'(z)^T dy; then forward+backward in `mlp_blocks` blocks of intermediate channels
         (gate/up/act/dact exist one block at a time): dm, then dh1 = dy + N_mlp_in'(h1)^T dm;
      3. d(o_proj out) = N_attn_out'^T dh1; attention backward one kv group and one block of `query_rows`
         queries (or sliding band) at a time, p recomputed; RoPE and q/k-norm backward; q/k/v backward;
      4. dx = dh1 + N_attn_in'(x)^T da.
    LoRA `h = x A^T` terms are recomputed inside each linear's backward. `graphs.sublayer` runs the same
    steps as separate calls (attention; MLP channel blocks).
    """
    L = _Layer(spec, weights, attention, x.shape[1], x.dtype, query_rows)
    forward = _attention_by_group(x, L, lora, scale)  # 1.
    h1 = forward[0]
    dz = dy  # 2.
    if L.fam.norm("mlp_out") is not None:
        dz = L.norm_backward("mlp_out", _mlp_by_block(L.norm("mlp_in", h1), L, lora, scale, mlp_blocks), dy)
    dm, grads = _mlp_backward(h1, dz, L, lora, scale, mlp_blocks)
    dh1 = dy + L.norm_backward("mlp_in", h1, dm)
    del h1, dz, dm
    dx, attention_grads = _attention_backward(x, dh1, L, lora, scale, forward)  # 3., 4.
    grads.update(attention_grads)
    return dx, {name: grads[name] for name in lora}


def _mlp_backward(h1: Tensor, dz: Tensor, L: _Layer, lora: dict[str, Tensor], scale: float, mlp_blocks: int
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """(dm, MLP LoRA gradients) for dz = d(down output): forward+backward one block of intermediate channels
    at a time (gate/up/act/dact exist one block at a time); dm is the gradient w.r.t. m = N_mlp_in(h1)."""
    W = L.W
    m = L.norm("mlp_in", h1)
    gate = ops.RowBlockLora(m, W["mlp.gate_proj.weight"], W.get("mlp.gate_proj.bias"),
                            *_lora_pair(lora, "mlp.gate_proj"), scale)
    up = ops.RowBlockLora(m, W["mlp.up_proj.weight"], W.get("mlp.up_proj.bias"), *_lora_pair(lora, "mlp.up_proj"),
                          scale)
    down = ops.ColBlockLora(dz, W["mlp.down_proj.weight"], *_lora_pair(lora, "mlp.down_proj"), scale)
    for J in ops.blocks(W["mlp.gate_proj.weight"].shape[0], mlp_blocks):
        gate_J, up_J = gate.forward(J), up.forward(J)  # (B, S, |J|)
        act_J, dgate_J, dup_J = _glu_with_backward(gate_J, up_J, down, J, L.fam.activation)
        up.backward(J, dup_J)
        gate.backward(J, dgate_J)
        del gate_J, up_J, act_J, dgate_J, dup_J
    grads: dict[str, Tensor] = {}
    dm = None
    for module, block in (("mlp.gate_proj", gate), ("mlp.up_proj", up)):
        d, dA, dB = block.finish()
        dm = d if dm is None else dm + d
        _store(grads, module, dA, dB)
    _store(grads, "mlp.down_proj", *down.finish())
    return dm, grads


def _attention_backward(x: Tensor, dh1: Tensor, L: _Layer, lora: dict[str, Tensor], scale: float, forward: tuple
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """(dx, attention LoRA gradients) from dh1 = d h1 and the kept results of `_attention_by_group`:
    d(o_proj out) = N_attn_out'^T dh1; one kv group and one block of queries (or sliding band) at a time, p
    recomputed; RoPE and q/k-norm backward; q/k/v backward; dx = dh1 + N_attn_in'(x)^T da."""
    _, o_out, proj, qs, ks, vs = forward
    W, g, D = L.W, L.g, L.D
    Jq = [slice(j * g * D, (j + 1) * g * D) for j in range(L.nkv)]
    Jk = [slice(j * D, (j + 1) * D) for j in range(L.nkv)]
    do_out = L.norm_backward("attn_out", o_out, dh1)
    del o_out
    o_proj = ops.ColBlockLora(do_out, W["self_attn.o_proj.weight"], *_lora_pair(lora, "self_attn.o_proj"), scale)
    for j in range(L.nkv):
        q_raw, k_raw, v = qs[j], ks[j], vs[j]
        q, k = L.qk("q", q_raw), L.qk("k", k_raw)[:, 0]  # (B, g, S, D), (B, S, D)
        o = ops.merge_heads(ops.group_attention(q, k, v, L.qscale, L.window, L.query_rows))  # (B, S, g*D)
        do = ops.split_heads(o_proj.backward(Jq[j], o), g, D)  # (B, g, S, D)
        del o
        dq, dk, dv = ops.group_attention_backward(q, k, v, do, L.qscale, L.window, L.query_rows)
        proj["q"].backward(Jq[j], ops.merge_heads(L.qk_backward("q", q_raw, dq)))
        proj["k"].backward(Jk[j], L.qk_backward("k", k_raw, dk.unsqueeze(1))[:, 0])
        proj["v"].backward(Jk[j], dv)
        qs[j] = ks[j] = vs[j] = None
        del q, k, v, q_raw, k_raw, do, dq, dk, dv
    grads: dict[str, Tensor] = {}
    _store(grads, "self_attn.o_proj", *o_proj.finish())
    da = None
    for name in ("q", "k", "v"):
        d, dA, dB = proj[name].finish()
        da = d if da is None else da + d
        _store(grads, f"self_attn.{name}_proj", dA, dB)
    return dh1 + L.norm_backward("attn_in", x, da), grads


def _glu_with_backward(gate_J: Tensor, up_J: Tensor, down: ops.ColBlockLora, J: slice, kind: str):
    """act_J = act(gate_J) * up_J fed to down's backward for block J; returns (act_J, dgate_J, dup_J)."""
    if kind == "silu":  # written out so that the Qwen2 graph keeps its ops
        sig = torch.sigmoid(gate_J)
        silu_J = gate_J * sig
        act_J = silu_J * up_J
        dact = down.backward(J, act_J)
        return act_J, dact * up_J * sig * (1 + gate_J * (1 - sig)), dact * silu_J  # silu' = s(1 + z(1 - s))
    act_J = ops.glu(gate_J, up_J, kind)
    dact = down.backward(J, act_J)
    _, dgate, dup = ops.glu_backward(gate_J, up_J, dact, kind)
    return act_J, dgate, dup


def _store(grads: dict[str, Tensor], module: str, dA: Tensor | None, dB: Tensor | None) -> None:
    if dA is not None:
        grads[f"{module}.lora_A"] = dA
        grads[f"{module}.lora_B"] = dB


def decoder_layer_backward_autodiff(x: Tensor, dy: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                                    spec: ModelSpec, scale: float, attention: str | None = None
                                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """MeBP baseline: recompute the layer forward under autograd and take its vector-Jacobian product.

    dx, dA, dB = d/d(x, A, B) of <DecoderLayer(x), dy>.
    """
    names = list(lora)
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        lora_ = {n: lora[n].detach().requires_grad_(True) for n in names}
        y = decoder_layer_forward(x_, weights, lora_, spec, scale, attention)
        grads = torch.autograd.grad(y, [x_] + [lora_[n] for n in names], dy)
    return grads[0], dict(zip(names, grads[1:]))
