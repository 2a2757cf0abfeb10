"""Token embedding and the causal-LM loss head, both over vocabulary chunks.

The tied embedding E (V, H) is only ever touched one chunk of C rows at a time, so neither E nor the
(S, V) logits exist in memory at once (for Qwen2.5, 151,936 x 256 float32 logits alone are 155 MB).

Loss (Hugging Face convention): labels are shifted by one (target of position t is labels[t+1]),
positions whose target is -100 are ignored, and the loss is the mean over counted positions:

    n = RMSNorm(x) * (w_norm + norm_offset);  z = n E^T;  loss = mean_t [logsumexp(z_t) - z_t[y_t]]

An online softmax over chunks keeps per position the running max mu, the sum s = sum exp(z - mu), the
softmax-weighted row sum P = sum exp(z - mu) E_v and the target row T = E[y_t]; at the end

    loss = mean_t (mu + log s - n.T),   dn_t = (P / s - T) / count,   dx = RMSNorm'(x)^T dn
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphs.config import VOCAB_CHUNK_ROWS
from graphs.ops import rms_norm, rms_norm_backward
from graphs.quant import embedding as embedding_rows

Tensor = torch.Tensor
IGNORE_INDEX = -100


def vocab_chunks(vocab_size: int, max_rows: int) -> tuple[int, int]:
    """(rows per chunk, number of chunks): balanced chunks of at most `max_rows`; the last one is padded."""
    count = math.ceil(vocab_size / max_rows)
    rows = math.ceil(vocab_size / count)
    return rows, count


def shift_labels(labels: Tensor) -> Tensor:
    """(B, S) -> (B, S): target[t] = labels[t + 1], target[S - 1] = -100."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def embed_chunk(input_ids: Tensor, weight_chunk: Tensor, offset: Tensor, acc: Tensor,
                scale_hidden: int | None = None) -> Tensor:
    """acc[b, t] += E[ids[b, t]] for the ids inside this chunk, E[offset:offset+C] = weight_chunk (C, H)
    (float, or a `graphs.quant.QuantizedWeight`: only the picked (B, S) rows are dequantized).

    `scale_hidden` H: the picked rows times `embedding_scale(H)` (Gemma), only the (B, S, H) rows, never
    the whole chunk."""
    rows = weight_chunk.shape[0]
    local = input_ids - offset  # (B, S)
    inside = torch.logical_and(local >= 0, local < rows)
    picked = embedding_rows(local.clamp(0, rows - 1), weight_chunk)  # (B, S, H)
    if scale_hidden is not None:
        picked = scale_embedding(picked, scale_hidden)
    return acc + torch.where(inside.unsqueeze(-1), picked, torch.zeros_like(picked))


def head_chunk(x: Tensor, norm_weight: Tensor, labels: Tensor, weight_chunk: Tensor, offset: Tensor,
               mu: Tensor, s: Tensor, P: Tensor, T: Tensor, eps: float, vocab_size: int, norm_offset: float = 0.0
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One online-softmax step over E[offset:offset+C] (rows past `vocab_size` are padding).

        z = RMSNorm(x) E_c^T;  mu' = max(mu, max z);  a = exp(mu - mu')
        s' = s a + sum exp(z - mu');  P' = P a + exp(z - mu') E_c;  T' = T + E[y] (y inside chunk)
    x (B, S, H), labels (B, S) unshifted, mu/s (B, S), P/T (B, S, H); norm_offset 1: Gemma's (1 + w).
    """
    n = rms_norm(x, norm_weight, eps, norm_offset)
    z = F.linear(n, weight_chunk)  # (B, S, C): n E_c^T, E_c read as linear's weight (no transposed copy of it)
    row_ids = offset + torch.arange(weight_chunk.shape[0], dtype=offset.dtype)
    z = z.masked_fill(row_ids >= vocab_size, float("-inf"))
    mu_new = torch.maximum(mu, z.amax(-1))
    a = torch.exp(mu - mu_new)
    e = torch.exp(z - mu_new.unsqueeze(-1))  # (B, S, C)
    s_new = s * a + e.sum(-1)
    P_new = P * a.unsqueeze(-1) + e @ weight_chunk
    T_new = embed_chunk(shift_labels(labels), weight_chunk, offset, T)
    return mu_new, s_new, P_new, T_new


def head_finish(x: Tensor, norm_weight: Tensor, labels: Tensor, mu: Tensor, s: Tensor, P: Tensor, T: Tensor,
                eps: float, norm_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """loss = sum_t valid_t (mu + log s - n.T) / count;  dx = RMSNorm'(x)^T [(P / s - T) valid / count]."""
    n = rms_norm(x, norm_weight, eps, norm_offset)
    valid = (shift_labels(labels) != IGNORE_INDEX).to(x.dtype)  # (B, S)
    count = valid.sum().clamp(min=1.0)
    nll = mu + torch.log(s) - (n * T).sum(-1)
    loss = (nll * valid).sum() / count
    dn = (P / s.unsqueeze(-1) - T) * (valid / count).unsqueeze(-1)
    return loss, rms_norm_backward(x, norm_weight, eps, dn, norm_offset)


def head_init_state(batch: int, seq_len: int, hidden: int, dtype: torch.dtype = torch.float32
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mu, s, P, T) before the first chunk: mu = -inf, the rest zeros."""
    return (torch.full((batch, seq_len), float("-inf"), dtype=dtype), torch.zeros(batch, seq_len, dtype=dtype),
            torch.zeros(batch, seq_len, hidden, dtype=dtype), torch.zeros(batch, seq_len, hidden, dtype=dtype))


def chunk_weight(embedding: Tensor, index: int, rows: int) -> Tensor:
    """Rows [index*rows, (index+1)*rows) of E, zero-padded past the vocabulary."""
    part = embedding[index * rows:(index + 1) * rows]
    if part.shape[0] < rows:
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], part.shape[1])])
    return part


def embed(input_ids: Tensor, embedding: Tensor, max_rows: int = VOCAB_CHUNK_ROWS) -> Tensor:
    """E[ids], computed chunk by chunk as the exported graphs do.  ids (B, S) -> (B, S, H)."""
    rows, count = vocab_chunks(embedding.shape[0], max_rows)
    acc = embedding.new_zeros(*input_ids.shape, embedding.shape[1])
    for c in range(count):
        acc = embed_chunk(input_ids, chunk_weight(embedding, c, rows), torch.tensor([c * rows]), acc)
    return acc


def embedding_scale(hidden_size: int, dtype: torch.dtype) -> Tensor:
    """Gemma's embedding multiplier sqrt(hidden) as transformers applies it: a float32 scalar cast to the
    embedding's dtype (so in bfloat16 it is rounded to bfloat16)."""
    return torch.tensor(hidden_size ** 0.5, dtype=torch.float32).to(dtype)


def scale_embedding(x: Tensor, hidden_size: int) -> Tensor:
    """x * embedding_scale(hidden, x.dtype): applied to E[ids] by families with `scale_embedding`."""
    return x * embedding_scale(hidden_size, x.dtype)


def lm_head_loss(x: Tensor, norm_weight: Tensor, embedding: Tensor, labels: Tensor, eps: float,
                 max_rows: int = VOCAB_CHUNK_ROWS, norm_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Final RMSNorm + tied LM head + causal-LM cross-entropy, forward and backward: (loss, dL/dx)."""
    vocab = embedding.shape[0]
    rows, count = vocab_chunks(vocab, max_rows)
    state = head_init_state(x.shape[0], x.shape[1], x.shape[2], x.dtype)
    for c in range(count):
        state = head_chunk(x, norm_weight, labels, chunk_weight(embedding, c, rows), torch.tensor([c * rows]),
                           *state, eps=eps, vocab_size=vocab, norm_offset=norm_offset)
    return head_finish(x, norm_weight, labels, *state, eps=eps, norm_offset=norm_offset)
