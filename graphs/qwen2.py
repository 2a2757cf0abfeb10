"""The Qwen2 API of graphs/ (kept for its callers): the shared ops and the generic decoder layer.

The math lives in `graphs.ops` (per-op forward and backward) and `graphs.layer` (one decoder layer of
any family, read from `graphs.family`); Qwen2 is the family `graphs.families.qwen2`. These names are
the same functions, so a Qwen2 spec computes exactly what it did before the family seam.
"""
from __future__ import annotations

import torch

from graphs.layer import (
    decoder_layer_backward,
    decoder_layer_backward_autodiff,
    decoder_layer_forward,
    decoder_layer_forward_structured,
)
from graphs.ops import (
    apply_rope,
    apply_rope_backward,
    attention_probs,
    causal_mask,
    lora_linear,
    lora_linear_backward,
    rms_norm,
    rms_norm_backward,
    rope_cos_sin,
    rotate_half,
)
from graphs import ops

Tensor = torch.Tensor
__all__ = ["apply_rope", "apply_rope_backward", "attention_probs", "causal_attention", "causal_attention_backward",
           "causal_mask", "decoder_layer_backward", "decoder_layer_backward_autodiff", "decoder_layer_forward",
           "decoder_layer_forward_structured", "lora_linear", "lora_linear_backward", "rms_norm", "rms_norm_backward",
           "rope_cos_sin", "rotate_half"]


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """o = softmax(q k^T / sqrt(D) + causal) v, grouped-query.  q (B, nh, S, D), k/v (B, nkv, S, D)."""
    return ops.attention(q, k, v)


def causal_attention_backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of grouped-query causal attention, p recomputed: q (B, g, S, D), k/v (B, S, D), do like q."""
    return ops.group_attention_backward(q, k, v, do)
