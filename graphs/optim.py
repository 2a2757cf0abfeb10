"""Optimizer updates for one layer's LoRA tensors, as plain functions (one graph serves every layer).

SGD:    p' = p - lr g
AdamW (torch.optim.AdamW semantics, t = step + 1):
        p  <- p (1 - lr wd)
        m' = b1 m + (1 - b1) g;   v' = b2 v + (1 - b2) g^2
        p' = p - lr (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps)
`step` is the number of updates already applied (a float tensor of shape (1,)); AdamW returns step + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class AdamWSettings:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def sgd_update(params: list[Tensor], grads: list[Tensor], lr: Tensor) -> list[Tensor]:
    """p' = p - lr g for each tensor."""
    return [p - lr * g for p, g in zip(params, grads)]


def adamw_update(params: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
                 lr: Tensor, step: Tensor, hp: AdamWSettings = AdamWSettings()
                 ) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """One AdamW step for each tensor; returns (params', exp_avg', exp_avg_sq', step + 1)."""
    t = step + 1
    bias1 = 1 - torch.pow(torch.full_like(t, hp.beta1), t)
    bias2 = 1 - torch.pow(torch.full_like(t, hp.beta2), t)
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        p = p * (1 - lr * hp.weight_decay)
        m = hp.beta1 * m + (1 - hp.beta1) * g
        v = hp.beta2 * v + (1 - hp.beta2) * g * g
        p = p - (lr / bias1) * m / (torch.sqrt(v) / torch.sqrt(bias2) + hp.eps)
        new_p.append(p), new_m.append(m), new_v.append(v)
    return new_p, new_m, new_v, t
