"""One Qwen2 decoder layer with LoRA: forward, a backward derived by hand, and the autodiff backward.

Follows Hugging Face `Qwen2DecoderLayer` (eager attention) exactly:

    a  = RMSNorm(x) * w_ln1
    q, k, v = LoRALinear(a)   (q/k/v with bias), RoPE on q and k
    o  = softmax(q k^T / sqrt(D) + causal) v          (grouped-query: head h reads kv head h // g)
    h1 = x + LoRALinear_o(o)
    m  = RMSNorm(h1) * w_ln2
    y  = h1 + LoRALinear_down(silu(LoRALinear_gate(m)) * LoRALinear_up(m))

Tensors: `weights` maps Hugging Face names relative to the layer (`self_attn.q_proj.weight`, ...)
to frozen tensors; `lora` maps `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r) for each
adapted module. Activations are (B, S, H).

`decoder_layer_backward` is the structured (MeSP) backward: its only saved activation is x; every
intermediate is recomputed from x inside it, attention one kv-head group at a time and the MLP one
block of intermediate channels at a time, and each LoRA `h = x A^T` is recomputed, never stored.
`decoder_layer_backward_autodiff` is the per-layer checkpointing (MeBP) baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphs.config import ModelSpec

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- RMSNorm

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * w   (over the last dim)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * r * weight


def rms_norm_backward(x: Tensor, weight: Tensor, eps: float, dy: Tensor) -> Tensor:
    """dx = r * (dy*w - xh * mean(dy*w*xh)), with r = rsqrt(mean(x^2)+eps), xh = x*r. (w frozen.)"""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xh = x * r
    dxh = dy * weight
    return r * (dxh - xh * (dxh * xh).mean(-1, keepdim=True))


# ----------------------------------------------------------------------------- RoPE

def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (S, D): angle[t, i] = t / theta^(2(i mod D/2)/D), as Hugging Face computes them.

    `ones / p`, not `1.0 / p`: the same float32 division (bit-identical inv_freq), but a division for every
    converter, where `1.0 / p` is `reciprocal`, which coremltools lowers to `inverse(p, epsilon=1e-4)`."""
    p = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim)  # (D/2,)
    inv_freq = torch.ones_like(p) / p
    positions = torch.arange(seq_len, dtype=torch.int64).to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """R x with R = [[0, -I], [I, 0]]: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + R x * sin."""
    return x * cos + rotate_half(x) * sin


def apply_rope_backward(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """dx = dy * cos + R^T (dy * sin) = dy * cos - R (dy * sin), since R^T = -R."""
    return dy * cos - rotate_half(dy * sin)


# ----------------------------------------------------------------------------- attention

def causal_mask(seq_len: int) -> Tensor:
    """(S, S) bool, True where key position > query position (masked out)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)


def attention_probs(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """p = softmax(q k^T / sqrt(D) + causal).  q (B, G, g, S, D), k (B, G, 1, S, D) -> (B, G, g, S, S)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """o = softmax(q k^T / sqrt(D) + causal) v, grouped-query.  q (B, nh, S, D), k/v (B, nkv, S, D)."""
    B, nh, S, D = q.shape
    nkv = k.shape[1]
    qg = q.view(B, nkv, nh // nkv, S, D)  # (B, nkv, g, S, D)
    p = attention_probs(qg, k.unsqueeze(2), causal_mask(S))
    return (p @ v.unsqueeze(2)).view(B, nh, S, D)


def causal_attention_backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of grouped-query causal attention, p recomputed from q and k.

    q (B, g, S, D) are the g query heads that share k, v (B, S, D); do like q.
        dv = sum_g p^T do;  dp = do v^T;  ds = p * (dp - rowsum(dp * p)) / sqrt(D)
        dq = ds k;  dk = sum_g ds^T q
    """
    S, D = q.shape[-2], q.shape[-1]
    k1, v1 = k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, S, D)
    p = attention_probs(q, k1, causal_mask(S))  # (B, g, S, S)
    dv = (p.transpose(-1, -2) @ do).sum(1)
    dp = do @ v1.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * (D ** -0.5)
    del p, dp
    dq = ds @ k1
    dk = (ds.transpose(-1, -2) @ q).sum(1)
    return dq, dk, dv


# ----------------------------------------------------------------------------- LoRA linear

def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None,
                lora_B: Tensor | None, scale: float) -> Tensor:
    """y = x W^T + b + s (x A^T) B^T."""
    y = F.linear(x, weight, bias)
    if lora_A is not None:
        y = y + scale * ((x @ lora_A.T) @ lora_B.T)
    return y


def lora_linear_backward(x: Tensor, dy: Tensor, weight: Tensor, lora_A: Tensor | None,
                         lora_B: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """With h = x A^T recomputed (never stored):
        dB = s dy^T h;   dA = s (dy B)^T x;   dx = dy W + s (dy B) A
    x (..., in), dy (..., out) -> dx (..., in), dA (r, in), dB (out, r).
    """
    dx = dy @ weight
    if lora_A is None:
        return dx, None, None
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, in), (N, out)
    h = x2 @ lora_A.T  # (N, r)
    gB = dy2 @ lora_B  # (N, r)
    dB = scale * (dy2.T @ h)
    dA = scale * (gB.T @ x2)
    dx = dx + scale * (gB @ lora_A).view(dx.shape)
    return dx, dA, dB


class _RowBlockLora:
    """y = x W^T + b + s h B^T (h = x A^T), visited in blocks of output rows J.

    forward(J) gives y[..., J]; backward(J, dy_J) returns dy_J W[J] and records dB[J] = s dy_J^T h and
    gB += dy_J B[J]; finish() adds the LoRA part of dx (s gB A) and returns dx, dA = s gB^T x, dB.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None,
                 lora_B: Tensor | None, scale: float):
        self.x, self.weight, self.bias, self.A, self.B, self.s = x, weight, bias, lora_A, lora_B, scale
        self.h = x @ lora_A.T if lora_A is not None else None  # (B, S, r), recomputed, tiny
        self.dx: Tensor | None = None
        self.gB: Tensor | None = None
        self.dB_blocks: list[Tensor] = []

    def forward(self, J: slice) -> Tensor:
        y = F.linear(self.x, self.weight[J], None if self.bias is None else self.bias[J])
        if self.h is not None:
            y = y + self.s * (self.h @ self.B[J].T)
        return y

    def backward(self, J: slice, dy: Tensor) -> None:
        dx = dy @ self.weight[J]
        self.dx = dx if self.dx is None else self.dx + dx
        if self.h is not None:
            dy2 = dy.reshape(-1, dy.shape[-1])
            self.dB_blocks.append(self.s * (dy2.T @ self.h.reshape(-1, self.h.shape[-1])))
            gB = dy @ self.B[J]
            self.gB = gB if self.gB is None else self.gB + gB

    def finish(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self.h is None:
            return self.dx, None, None
        x2, gB2 = self.x.reshape(-1, self.x.shape[-1]), self.gB.reshape(-1, self.gB.shape[-1])
        dA = self.s * (gB2.T @ x2)
        dB = torch.cat(self.dB_blocks, dim=0)
        return self.dx + self.s * (self.gB @ self.A), dA, dB


class _ColBlockLora:
    """Backward of y = x W^T + s h B^T (h = x A^T) with x visited in blocks of input columns J.

    backward(J, x_J) returns dx_J = dy W[:, J] + s (dy B) A[:, J], records dA[:, J] = s (dy B)^T x_J and
    accumulates h += x_J A[:, J]^T; finish() returns dA, dB = s dy^T h.
    """

    def __init__(self, dy: Tensor, weight: Tensor, lora_A: Tensor | None, lora_B: Tensor | None, scale: float):
        self.dy, self.weight, self.A, self.s = dy, weight, lora_A, scale
        self.gB = dy @ lora_B if lora_A is not None else None  # (B, S, r)
        self.h: Tensor | None = None
        self.dA_blocks: list[Tensor] = []

    def backward(self, J: slice, x_J: Tensor) -> Tensor:
        dx = self.dy @ self.weight[:, J]
        if self.gB is None:
            return dx
        x2, gB2 = x_J.reshape(-1, x_J.shape[-1]), self.gB.reshape(-1, self.gB.shape[-1])
        self.dA_blocks.append(self.s * (gB2.T @ x2))
        h = x_J @ self.A[:, J].T
        self.h = h if self.h is None else self.h + h
        return dx + self.s * (self.gB @ self.A[:, J])

    def finish(self) -> tuple[Tensor | None, Tensor | None]:
        if self.gB is None:
            return None, None
        dy2, h2 = self.dy.reshape(-1, self.dy.shape[-1]), self.h.reshape(-1, self.h.shape[-1])
        return torch.cat(self.dA_blocks, dim=1), self.s * (dy2.T @ h2)


# ----------------------------------------------------------------------------- the layer

def _lora_pair(lora: dict[str, Tensor], module: str) -> tuple[Tensor | None, Tensor | None]:
    return lora.get(f"{module}.lora_A"), lora.get(f"{module}.lora_B")


def _proj(x: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor], module: str, scale: float) -> Tensor:
    return lora_linear(x, weights[f"{module}.weight"], weights.get(f"{module}.bias"), *_lora_pair(lora, module), scale)


def decoder_layer_forward(x: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                          spec: ModelSpec, scale: float) -> Tensor:
    """y = DecoderLayer(x) as in the module docstring.  x (B, S, H) -> y (B, S, H)."""
    B, S, H = x.shape
    nh, nkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = rope_cos_sin(S, D, spec.rope_theta, x.dtype)

    a = rms_norm(x, weights["input_layernorm.weight"], spec.rms_norm_eps)
    q = _proj(a, weights, lora, "self_attn.q_proj", scale).view(B, S, nh, D).transpose(1, 2)  # (B, nh, S, D)
    k = _proj(a, weights, lora, "self_attn.k_proj", scale).view(B, S, nkv, D).transpose(1, 2)  # (B, nkv, S, D)
    v = _proj(a, weights, lora, "self_attn.v_proj", scale).view(B, S, nkv, D).transpose(1, 2)  # (B, nkv, S, D)
    o = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    o = o.transpose(1, 2).reshape(B, S, H)  # (B, S, nh*D)
    h1 = x + _proj(o, weights, lora, "self_attn.o_proj", scale)

    m = rms_norm(h1, weights["post_attention_layernorm.weight"], spec.rms_norm_eps)
    act = F.silu(_proj(m, weights, lora, "mlp.gate_proj", scale)) * _proj(m, weights, lora, "mlp.up_proj", scale)
    return h1 + _proj(act, weights, lora, "mlp.down_proj", scale)


def _blocks(n: int, parts: int) -> list[slice]:
    """Split range(n) into `parts` contiguous blocks (the first ones one longer when uneven)."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(parts)]


def _heads(t: Tensor, n: int, D: int) -> Tensor:
    """(B, S, n*D) -> (B, n, S, D)."""
    return t.view(t.shape[0], t.shape[1], n, D).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """(B, n, S, D) -> (B, S, n*D)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _attention_by_group(x: Tensor, W: dict[str, Tensor], lora: dict[str, Tensor], spec: ModelSpec, scale: float,
                        cos: Tensor, sin: Tensor, mask: Tensor):
    """h1 = x + o_proj(attention(RMSNorm(x))), computed one kv-head group at a time.

    Group j owns q rows Jq = [j*g*D, (j+1)*g*D) and k/v rows Jk = [j*D, (j+1)*D); its probabilities p
    (B, g, S, S) and output exist only inside the loop. Returns (h1, q/k/v row-block projections,
    roped q per group (B, g, S, D), roped k and v per group (B, S, D)).
    """
    nh, nkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    g = nh // nkv
    a = rms_norm(x, W["input_layernorm.weight"], spec.rms_norm_eps)
    proj = {name: _RowBlockLora(a, W[f"self_attn.{name}_proj.weight"], W[f"self_attn.{name}_proj.bias"],
                                *_lora_pair(lora, f"self_attn.{name}_proj"), scale) for name in ("q", "k", "v")}
    Ao, Bo = _lora_pair(lora, "self_attn.o_proj")
    qs, ks, vs = [], [], []
    o_out = ho = None
    for j in range(nkv):
        Jq, Jk = slice(j * g * D, (j + 1) * g * D), slice(j * D, (j + 1) * D)
        q = apply_rope(_heads(proj["q"].forward(Jq), g, D), cos, sin)  # (B, g, S, D)
        k = apply_rope(_heads(proj["k"].forward(Jk), 1, D), cos, sin)[:, 0]  # (B, S, D)
        v = _heads(proj["v"].forward(Jk), 1, D)[:, 0]  # (B, S, D)
        o = _merge(attention_probs(q, k.unsqueeze(1), mask) @ v.unsqueeze(1))  # (B, S, g*D)
        part = o @ W["self_attn.o_proj.weight"][:, Jq].T
        o_out = part if o_out is None else o_out + part
        if Ao is not None:
            hpart = o @ Ao[:, Jq].T
            ho = hpart if ho is None else ho + hpart
        qs.append(q), ks.append(k), vs.append(v)
        del o, part
    if Ao is not None:
        o_out = o_out + scale * (ho @ Bo.T)
    return x + o_out, proj, qs, ks, vs


def _mlp_by_block(m: Tensor, W: dict[str, Tensor], lora: dict[str, Tensor], spec: ModelSpec, scale: float,
                  mlp_blocks: int) -> Tensor:
    """down(silu(gate(m)) * up(m)), one block J of intermediate channels at a time:
    sum_J act_J Wd[:, J]^T + s (sum_J act_J Ad[:, J]^T) Bd^T."""
    gate = _RowBlockLora(m, W["mlp.gate_proj.weight"], None, *_lora_pair(lora, "mlp.gate_proj"), scale)
    up = _RowBlockLora(m, W["mlp.up_proj.weight"], None, *_lora_pair(lora, "mlp.up_proj"), scale)
    Wd = W["mlp.down_proj.weight"]
    Ad, Bd = _lora_pair(lora, "mlp.down_proj")
    out = hd = None
    for J in _blocks(spec.intermediate_size, mlp_blocks):
        act = F.silu(gate.forward(J)) * up.forward(J)  # (B, S, |J|)
        part = act @ Wd[:, J].T
        out = part if out is None else out + part
        if Ad is not None:
            hpart = act @ Ad[:, J].T
            hd = hpart if hd is None else hd + hpart
        del act, part
    if Ad is not None:
        out = out + scale * (hd @ Bd.T)
    return out


def decoder_layer_forward_structured(x: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                                     spec: ModelSpec, scale: float, mlp_blocks: int = 4) -> Tensor:
    """The same y as `decoder_layer_forward`, with attention one kv group and the MLP one channel block
    at a time, so no (B, nh, S, S) or (B, S, I) tensor exists at once."""
    cos, sin = rope_cos_sin(x.shape[1], spec.head_dim, spec.rope_theta, x.dtype)
    h1 = _attention_by_group(x, weights, lora, spec, scale, cos, sin, causal_mask(x.shape[1]))[0]
    m = rms_norm(h1, weights["post_attention_layernorm.weight"], spec.rms_norm_eps)
    return h1 + _mlp_by_block(m, weights, lora, spec, scale, mlp_blocks)


def decoder_layer_backward(x: Tensor, dy: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                           spec: ModelSpec, scale: float, mlp_blocks: int = 4
                           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Structured backward of one decoder layer: (x, dy) -> (dx, {lora name: gradient}).

    Recomputes the forward from x and differentiates it by hand:
      1. attention forward one kv group at a time, keeping only q, k (roped), v, the o_proj
         output and a = RMSNorm(x): h1 = x + o_proj(o); p and o are released per group;
      2. MLP forward+backward in `mlp_blocks` blocks of intermediate channels (gate/up/act/dact
         exist one block at a time): dm, then dh1 = dy + RMSNorm'(h1)^T dm;
      3. attention backward one kv group at a time (p recomputed), RoPE backward, q/k/v backward;
      4. dx = dh1 + RMSNorm'(x)^T da.
    LoRA `h = x A^T` terms are recomputed inside each linear's backward.
    """
    B, S, H = x.shape
    nh, nkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    g = nh // nkv
    eps = spec.rms_norm_eps
    W = weights
    cos, sin = rope_cos_sin(S, D, spec.rope_theta, x.dtype)
    mask = causal_mask(S)

    # 1. attention forward, per kv group (keeps roped q, k, v and the q/k/v projections' LoRA h)
    h1, proj, qs, ks, vs = _attention_by_group(x, W, lora, spec, scale, cos, sin, mask)
    Jq = [slice(j * g * D, (j + 1) * g * D) for j in range(nkv)]
    Jk = [slice(j * D, (j + 1) * D) for j in range(nkv)]
    Ao, Bo = _lora_pair(lora, "self_attn.o_proj")

    # 2. MLP forward + backward, one block of intermediate channels at a time
    m = rms_norm(h1, W["post_attention_layernorm.weight"], eps)
    gate = _RowBlockLora(m, W["mlp.gate_proj.weight"], None, *_lora_pair(lora, "mlp.gate_proj"), scale)
    up = _RowBlockLora(m, W["mlp.up_proj.weight"], None, *_lora_pair(lora, "mlp.up_proj"), scale)
    down = _ColBlockLora(dy, W["mlp.down_proj.weight"], *_lora_pair(lora, "mlp.down_proj"), scale)
    for J in _blocks(spec.intermediate_size, mlp_blocks):
        gate_J, up_J = gate.forward(J), up.forward(J)  # (B, S, |J|)
        sig = torch.sigmoid(gate_J)
        silu_J = gate_J * sig
        dact = down.backward(J, silu_J * up_J)  # act_J = silu(gate_J) * up_J
        up.backward(J, dact * silu_J)
        gate.backward(J, dact * up_J * sig * (1 + gate_J * (1 - sig)))  # silu'(z) = s(z)(1 + z(1 - s(z)))
        del gate_J, up_J, sig, silu_J, dact
    grads: dict[str, Tensor] = {}
    dm = None
    for module, block in (("mlp.gate_proj", gate), ("mlp.up_proj", up)):
        d, dA, dB = block.finish()
        dm = d if dm is None else dm + d
        _store(grads, module, dA, dB)
    _store(grads, "mlp.down_proj", *down.finish())
    dh1 = dy + rms_norm_backward(h1, W["post_attention_layernorm.weight"], eps, dm)
    del m, gate, up, down, dm, h1

    # 3. attention backward, per kv group (p recomputed)
    o_proj = _ColBlockLora(dh1, W["self_attn.o_proj.weight"], Ao, Bo, scale)
    for j in range(nkv):
        q, k, v = qs[j], ks[j], vs[j]
        o = _merge(attention_probs(q, k.unsqueeze(1), mask) @ v.unsqueeze(1))  # (B, S, g*D)
        do = _heads(o_proj.backward(Jq[j], o), g, D)  # (B, g, S, D)
        del o
        dq, dk, dv = causal_attention_backward(q, k, v, do)
        proj["q"].backward(Jq[j], _merge(apply_rope_backward(dq, cos, sin)))
        proj["k"].backward(Jk[j], apply_rope_backward(dk, cos, sin))
        proj["v"].backward(Jk[j], dv)
        qs[j] = ks[j] = vs[j] = None
        del q, k, v, do, dq, dk, dv
    _store(grads, "self_attn.o_proj", *o_proj.finish())
    da = None
    for name in ("q", "k", "v"):
        d, dA, dB = proj[name].finish()
        da = d if da is None else da + d
        _store(grads, f"self_attn.{name}_proj", dA, dB)

    # 4. input RMSNorm and the residual
    dx = dh1 + rms_norm_backward(x, W["input_layernorm.weight"], eps, da)
    return dx, {name: grads[name] for name in lora}


def _store(grads: dict[str, Tensor], module: str, dA: Tensor | None, dB: Tensor | None) -> None:
    if dA is not None:
        grads[f"{module}.lora_A"] = dA
        grads[f"{module}.lora_B"] = dB


def decoder_layer_backward_autodiff(x: Tensor, dy: Tensor, weights: dict[str, Tensor], lora: dict[str, Tensor],
                                    spec: ModelSpec, scale: float) -> tuple[Tensor, dict[str, Tensor]]:
    """MeBP baseline: recompute the layer forward under autograd and take its vector-Jacobian product.

    dx, dA, dB = d/d(x, A, B) of <DecoderLayer(x), dy>.
    """
    names = list(lora)
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        lora_ = {n: lora[n].detach().requires_grad_(True) for n in names}
        y = decoder_layer_forward(x_, weights, lora_, spec, scale)
        grads = torch.autograd.grad(y, [x_] + [lora_[n] for n in names], dy)
    return grads[0], dict(zip(names, grads[1:]))

