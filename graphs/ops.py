"""The shared per-op math of every family's decoder layer: forward and hand-derived backward of each op.

RMSNorm (weight w or 1 + w), per-head q/k norm (the same RMSNorm over head_dim), RoPE (default,
linear and llama3 frequencies), grouped-query attention with a causal or sliding-window mask (the
sliding one computed over key bands only), LoRA linears (h = x A^T recomputed in the backward) and
the gated MLP activations (SwiGLU, GeGLU with gelu tanh). Every backward is checked against
torch.autograd in float64 (tests/test_graphs_math.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from graphs.config import RopeScaling
from graphs.quant import dense

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- RMSNorm

def _norm_weight(weight: Tensor, offset: float) -> Tensor:
    return weight + offset if offset else weight


def rms_norm(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * (w + offset)   (over the last dim; offset 1 is Gemma's 1 + w)."""
    r = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)  # x * x, not x.pow(2): the same bits, and a graph's
    return x * r * _norm_weight(weight, offset)              # mul kernel is several times faster than its pow


def rms_norm_backward(x: Tensor, weight: Tensor, eps: float, dy: Tensor, offset: float = 0.0) -> Tensor:
    """dx = r * (dy*w' - xh * mean(dy*w'*xh)), with r = rsqrt(mean(x^2)+eps), xh = x*r, w' = w + offset. (w frozen.)

    Also the backward of the per-head q/k norm: x (B, n, S, D) normalized over D."""
    r = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    xh = x * r
    dxh = dy * _norm_weight(weight, offset)
    return r * (dxh - xh * (dxh * xh).mean(-1, keepdim=True))


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """inv_freq[i] = theta ** -(2i / D) (then rescaled), float32, as Hugging Face computes it.

    Computed on the host without a reciprocal: the exponent is rounded to float32 as transformers rounds
    it (arange(0, D, 2) / D in float32), theta ** -e is taken in float64 and rounded to float32, so it
    equals transformers' 1 / theta ** e to float32 rounding (one ulp); the scalings then follow
    transformers' float32 steps (numpy float32). The returned tensor is a constant of the traced graph
    (no pow, no division inside it).
    linear: inv_freq / factor.  llama3 (wavelength w = 2 pi / inv_freq, L = original_max):
        w > L / low: inv_freq / factor;   w < L / high: inv_freq;
        otherwise (1 - s) inv_freq / factor + s inv_freq,  s = (L / w - low) / (high - low).
    """
    exps = (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)).astype(np.float64)
    inv = np.array([theta ** -float(e) for e in exps], dtype=np.float64).astype(np.float32)
    f32 = np.float32
    if scaling is not None and scaling.rope_type == "linear":
        inv = inv / f32(scaling.factor)
    elif scaling is not None and scaling.rope_type == "llama3":  # transformers' float32 steps, on the host
        L, lo, hi, factor = (f32(scaling.original_max_position_embeddings), f32(scaling.low_freq_factor),
                             f32(scaling.high_freq_factor), f32(scaling.factor))
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > L / lo, inv / factor, inv)
        smooth = (L / wavelen - lo) / (hi - lo)
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < L / hi) & ~(wavelen > L / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return torch.tensor(inv.tolist(), dtype=torch.float32)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: RopeScaling | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (S, D): angle[t, i] = t * inv_freq[i mod D/2], in float32 as Hugging Face computes them."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
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


def band_mask(q_start: int, q_stop: int, k_start: int, k_stop: int, window: int | None) -> Tensor:
    """(Sq, Sk) bool, True where masked: key j > query i, or (sliding) i - j >= window.

    Hugging Face's sliding window: query i sees keys i - window < j <= i (`kv_idx > q_idx - window`)."""
    if window is None and q_start == k_start == 0 and q_stop == k_stop:
        return causal_mask(q_stop)
    i = torch.arange(q_start, q_stop)[:, None]
    j = torch.arange(k_start, k_stop)[None, :]
    masked = j > i
    if window is not None:
        masked = torch.logical_or(masked, i - j >= window)  # (a `|` on bools has no Core ML conversion)
    return masked


def sliding_mask(seq_len: int, window: int) -> Tensor:
    """(S, S) causal sliding-window mask."""
    return band_mask(0, seq_len, 0, seq_len, window)


def attention_blocks(seq_len: int, window: int | None, query_rows: int | None = None) -> list[tuple[slice, slice]]:
    """(query rows, key columns) blocks covering every unmasked score.

    Causal (window None, or window >= S): one block, the whole S x S; with `query_rows` < S, blocks of
    `query_rows` queries, each against the keys [0, stop) (no query sees a later key), so a block's scores
    are at most query_rows x S and no S x S matrix exists. Sliding: blocks of `window` rows (or
    `query_rows`, when fewer), each against the keys [start - window + 1, stop): at most
    window x (2 window - 1) scores per block and about 2 S window in all, so time and memory grow with
    the window, not with S^2. Each block holds every key its rows see: a plain softmax per block is exact."""
    sliding = window is not None and window < seq_len
    rows = window if sliding else seq_len
    if query_rows is not None:
        rows = min(rows, query_rows)
    if rows >= seq_len:
        return [(slice(0, seq_len), slice(0, seq_len))]
    return [(slice(s, min(s + rows, seq_len)), slice(max(0, s - window + 1) if sliding else 0, min(s + rows, seq_len)))
            for s in range(0, seq_len, rows)]


def _rows(t: Tensor, sl: slice) -> Tensor:
    """t[..., sl, :], or t itself when sl is every row (a full slice would trace to an `alias` op)."""
    return t if sl.start == 0 and sl.stop == t.shape[-2] else t[..., sl, :]


def attention_probs(q: Tensor, k: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """p = softmax(q k^T * scale + mask), scale = D ** -0.5 unless given.
    q (..., Sq, D), k (..., Sk, D) broadcast -> (..., Sq, Sk)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def group_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, window: int | None = None,
                    query_rows: int | None = None) -> Tensor:
    """o = softmax(q k^T * scale + mask) v for g query heads sharing one kv head, one block of queries (and their
    keys, `attention_blocks`) at a time.

    q (B, g, S, D), k/v (B, S, D) -> o (B, g, S, D)."""
    S = q.shape[-2]
    k1, v1 = k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, S, D)
    outs = []
    for qs, ks in attention_blocks(S, window, query_rows):
        p = attention_probs(_rows(q, qs), _rows(k1, ks), band_mask(qs.start, qs.stop, ks.start, ks.stop, window),
                            scale)  # (B, g, |qs|, |ks|)
        outs.append(p @ _rows(v1, ks))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def group_attention_backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor, scale: float | None = None,
                             window: int | None = None, query_rows: int | None = None
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of `group_attention`, p recomputed from q and k one block of queries at a time.

    q (B, g, S, D) are the g query heads that share k, v (B, S, D); do like q.
        dv = sum_g p^T do;  dp = do v^T;  ds = p * (dp - rowsum(dp * p)) * scale
        dq = ds k;  dk = sum_g ds^T q
    A block's dk, dv cover its key columns only; they are zero-padded to S and summed.
    """
    S, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    k1, v1 = k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, S, D)
    dqs, dk, dv = [], None, None
    for qs, ks in attention_blocks(S, window, query_rows):
        qb, dob = _rows(q, qs), _rows(do, qs)
        kb, vb = _rows(k1, ks), _rows(v1, ks)
        p = attention_probs(qb, kb, band_mask(qs.start, qs.stop, ks.start, ks.stop, window), scale)
        dv_b = (p.transpose(-1, -2) @ dob).sum(1)  # (B, |ks|, D)
        dp = dob @ vb.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
        del p, dp
        dqs.append(ds @ kb)
        dk_b = (ds.transpose(-1, -2) @ qb).sum(1)
        if ks.start != 0 or ks.stop != S:
            pad = (0, 0, ks.start, S - ks.stop)
            dk_b, dv_b = F.pad(dk_b, pad), F.pad(dv_b, pad)
        dk = dk_b if dk is None else dk + dk_b
        dv = dv_b if dv is None else dv + dv_b
    dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=-2)
    return dq, dk, dv


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, window: int | None = None) -> Tensor:
    """Grouped-query attention over the full (S, S) scores with the causal (or sliding) mask: the reference.

    q (B, nh, S, D), k/v (B, nkv, S, D) -> (B, nh, S, D); head h reads kv head h // (nh / nkv)."""
    B, nh, S, D = q.shape
    nkv = k.shape[1]
    qg = q.view(B, nkv, nh // nkv, S, D)  # (B, nkv, g, S, D)
    mask = causal_mask(S) if window is None else sliding_mask(S, window)
    p = attention_probs(qg, k.unsqueeze(2), mask, scale)
    return (p @ v.unsqueeze(2)).view(B, nh, S, D)


# ----------------------------------------------------------------------------- gated MLP activations

def act(z: Tensor, kind: str) -> Tensor:
    """silu(z) = z sigmoid(z);  gelu_tanh(z) = z/2 (1 + tanh(c (z + 0.044715 z^3))), c = sqrt(2/pi)."""
    if kind == "silu":
        return F.silu(z)
    if kind == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    raise ValueError(f"unknown activation {kind!r}")


def glu(gate: Tensor, up: Tensor, kind: str) -> Tensor:
    """act(gate) * up  (SwiGLU with silu, GeGLU with gelu tanh)."""
    return act(gate, kind) * up


def glu_backward(gate: Tensor, up: Tensor, dout: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, dgate, dup) of out = act(gate) * up:  dup = dout act(gate);  dgate = dout up act'(gate).

    silu'(z) = s(z)(1 + z(1 - s(z)));  gelu_tanh'(z) = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 0.044715 z^2),
    t = tanh(c (z + 0.044715 z^3))."""
    if kind == "silu":
        sig = torch.sigmoid(gate)
        a = gate * sig
        da = sig * (1 + gate * (1 - sig))
    elif kind == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (gate + 0.044715 * gate.pow(3)))
        a = F.gelu(gate, approximate="tanh")
        da = 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * c * (1 + 3 * 0.044715 * gate * gate)
    else:
        raise ValueError(f"unknown activation {kind!r}")
    return a * up, dout * up * da, dout * a


# ----------------------------------------------------------------------------- LoRA linear

def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor | None,
                lora_B: Tensor | None, scale: float) -> Tensor:
    """y = x W^T + b + s (x A^T) B^T.  (W a float tensor or a `graphs.quant.QuantizedWeight`.)"""
    y = F.linear(x, dense(weight), bias)
    if lora_A is not None:
        y = y + scale * ((x @ lora_A.T) @ lora_B.T)
    return y


def lora_linear_backward(x: Tensor, dy: Tensor, weight: Tensor, lora_A: Tensor | None,
                         lora_B: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """With h = x A^T recomputed (never stored):
        dB = s dy^T h;   dA = s (dy B)^T x;   dx = dy W + s (dy B) A
    x (..., in), dy (..., out) -> dx (..., in), dA (r, in), dB (out, r).
    """
    dx = dy @ dense(weight)
    if lora_A is None:
        return dx, None, None
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, in), (N, out)
    h = x2 @ lora_A.T  # (N, r)
    gB = dy2 @ lora_B  # (N, r)
    dB = scale * tn(dy2, h)
    dA = scale * (gB.T @ x2)
    dx = dx + scale * (gB @ lora_A).view(dx.shape)
    return dx, dA, dB


def matmul(x: Tensor, M: Tensor) -> Tensor:
    """x @ M for M (K, N), read in the layout M has: a transposed view (a split bundle's down projection is
    stored as down^T, `exporter.graph_defs.TRANSPOSED`) as `F.linear(x, M^T)`, whose weight is then the
    stored tensor itself (the graph's two transposes cancel: `executorch.cancel_inverse_permutes`), so no
    transposed copy of the matrix is made; any other M as x @ M."""
    transposed = M.dim() == 2 and M.stride(0) == 1 and M.stride(1) != 1
    return F.linear(x, M.T) if transposed else x @ M


def tn(a: Tensor, h: Tensor) -> Tensor:
    """a^T h for a (N, n) and a narrow h (N, r), as (h^T a)^T: the transposed operand is the narrow one.

    A graph transposes an operand with a copy (ExecuTorch's portable permute_copy: a (256, 1216) activation
    per LoRA gradient); h^T and the (r, n) result are r / n of that. The same dot products."""
    return (h.T @ a).T


def rows(t, J: slice):
    """t[J] (a quantized t: those rows dequantized); all of t without a slice op when J covers it (an exported
    no-op slice still copies on ONNX Runtime)."""
    return dense(t) if _whole(J, t.shape[0]) else t[J]


def cols(t, J: slice):
    """t[:, J], likewise."""
    return dense(t) if _whole(J, t.shape[1]) else t[:, J]


def _whole(J: slice, n: int) -> bool:
    return (J.start or 0) == 0 and (J.stop is None or J.stop >= n) and J.step in (None, 1)


class RowBlockLora:
    """y = x W^T + b + s h B^T (h = x A^T), visited in blocks of output rows J (W[J] is all of W that a block
    reads: a quantized W dequantizes those rows only).

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
        y = F.linear(self.x, rows(self.weight, J), None if self.bias is None else rows(self.bias, J))
        if self.h is not None:
            y = y + self.s * (self.h @ rows(self.B, J).T)
        return y

    def backward(self, J: slice, dy: Tensor) -> None:
        dx = dy @ rows(self.weight, J)
        self.dx = dx if self.dx is None else self.dx + dx
        if self.h is not None:
            dy2 = dy.reshape(-1, dy.shape[-1])
            self.dB_blocks.append(self.s * tn(dy2, self.h.reshape(-1, self.h.shape[-1])))
            gB = dy @ rows(self.B, J)
            self.gB = gB if self.gB is None else self.gB + gB

    def finish(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self.h is None:
            return self.dx, None, None
        x2, gB2 = self.x.reshape(-1, self.x.shape[-1]), self.gB.reshape(-1, self.gB.shape[-1])
        dA = self.s * (gB2.T @ x2)
        dB = self.dB_blocks[0] if len(self.dB_blocks) == 1 else torch.cat(self.dB_blocks, dim=0)
        return self.dx + self.s * (self.gB @ self.A), dA, dB


class ColBlockLora:
    """Backward of y = x W^T + s h B^T (h = x A^T) with x visited in blocks of input columns J (W[:, J] only).

    backward(J, x_J) returns dx_J = dy W[:, J] + s (dy B) A[:, J], records dA[:, J] = s (dy B)^T x_J and
    accumulates h += x_J A[:, J]^T; finish() returns dA, dB = s dy^T h.
    """

    def __init__(self, dy: Tensor, weight: Tensor, lora_A: Tensor | None, lora_B: Tensor | None, scale: float):
        self.dy, self.weight, self.A, self.s = dy, weight, lora_A, scale
        self.gB = dy @ lora_B if lora_A is not None else None  # (B, S, r)
        self.h: Tensor | None = None
        self.dA_blocks: list[Tensor] = []

    def backward(self, J: slice, x_J: Tensor) -> Tensor:
        dx = matmul(self.dy, cols(self.weight, J))
        if self.gB is None:
            return dx
        x2, gB2 = x_J.reshape(-1, x_J.shape[-1]), self.gB.reshape(-1, self.gB.shape[-1])
        self.dA_blocks.append(self.s * (gB2.T @ x2))
        h = x_J @ cols(self.A, J).T
        self.h = h if self.h is None else self.h + h
        return dx + self.s * (self.gB @ cols(self.A, J))

    def finish(self) -> tuple[Tensor | None, Tensor | None]:
        if self.gB is None:
            return None, None
        dy2, h2 = self.dy.reshape(-1, self.dy.shape[-1]), self.h.reshape(-1, self.h.shape[-1])
        dA = self.dA_blocks[0] if len(self.dA_blocks) == 1 else torch.cat(self.dA_blocks, dim=1)
        return dA, self.s * tn(dy2, h2)


# ----------------------------------------------------------------------------- shapes

def blocks(n: int, parts: int) -> list[slice]:
    """Split range(n) into `parts` contiguous blocks (the first ones one longer when uneven)."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(parts)]


def split_heads(t: Tensor, n: int, D: int) -> Tensor:
    """(B, S, n*D) -> (B, n, S, D)."""
    return t.view(t.shape[0], t.shape[1], n, D).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """(B, n, S, D) -> (B, S, n*D)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)
