"""Every hand-derived backward in graphs/ against torch.autograd on the same forward, in float64.

Reference: torch.autograd.grad of the forward functions (relative error = max|ours - ref| / max|ref|).
"""
from __future__ import annotations

import pytest
import torch

from graphs import head, optim, qwen2
from graphs.config import ALL_TARGETS, LoraConfig
from helpers import random_layer_weights, random_lora, tiny_spec, torch_threads

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster than two and keeps the file's time stable."""
    with torch_threads(1):
        yield


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def vjp(fn, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    return list(torch.autograd.grad(fn(*inputs), inputs, dy))


def test_rms_norm_backward():
    x, w = torch.randn(2, 5, 32, dtype=F64), torch.randn(32, dtype=F64)
    dy = torch.randn_like(x)
    (ref,) = vjp(lambda x: qwen2.rms_norm(x, w, 1e-6), [x], dy)
    assert rel_err(qwen2.rms_norm_backward(x, w, 1e-6, dy), ref) <= TOL


def test_rope_backward():
    cos, sin = qwen2.rope_cos_sin(7, 16, 10000.0, F64)
    x = torch.randn(2, 3, 7, 16, dtype=F64)
    dy = torch.randn_like(x)
    (ref,) = vjp(lambda x: qwen2.apply_rope(x, cos, sin), [x], dy)
    assert rel_err(qwen2.apply_rope_backward(dy, cos, sin), ref) <= TOL


@pytest.mark.parametrize("g", [1, 3])
def test_causal_attention_backward(g):
    B, S, D = 2, 9, 8
    q, k, v = torch.randn(B, g, S, D, dtype=F64), torch.randn(B, S, D, dtype=F64), torch.randn(B, S, D, dtype=F64)
    do = torch.randn(B, g, S, D, dtype=F64)

    def attn(q, k, v):
        p = qwen2.attention_probs(q, k.unsqueeze(1), qwen2.causal_mask(S))
        return p @ v.unsqueeze(1)

    refs = vjp(attn, [q, k, v], do)
    for ours, ref in zip(qwen2.causal_attention_backward(q, k, v, do), refs):
        assert rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("with_lora", [True, False])
def test_lora_linear_backward(with_lora):
    x, W, b = torch.randn(2, 5, 12, dtype=F64), torch.randn(7, 12, dtype=F64), torch.randn(7, dtype=F64)
    A, Bm = (torch.randn(3, 12, dtype=F64), torch.randn(7, 3, dtype=F64)) if with_lora else (None, None)
    dy = torch.randn(2, 5, 7, dtype=F64)
    dx, dA, dB = qwen2.lora_linear_backward(x, dy, W, A, Bm, 2.0)
    if with_lora:
        refs = vjp(lambda x, A, Bm: qwen2.lora_linear(x, W, b, A, Bm, 2.0), [x, A, Bm], dy)
        for ours, ref in zip((dx, dA, dB), refs):
            assert rel_err(ours, ref) <= TOL
    else:
        (ref,) = vjp(lambda x: qwen2.lora_linear(x, W, b, None, None, 2.0), [x], dy)
        assert rel_err(dx, ref) <= TOL and dA is None and dB is None


SPECS = {
    "gqa": tiny_spec(),
    "mha": tiny_spec(num_heads=4, num_kv_heads=4, hidden_size=32, intermediate_size=40),
    "mqa": tiny_spec(num_heads=6, num_kv_heads=1, hidden_size=48, intermediate_size=72),
}
TARGET_SETS = [ALL_TARGETS, ("q", "v"), ("down",), ("o", "gate")]


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=["-".join(t) for t in TARGET_SETS])
@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("mlp_blocks", [1, 3, 0])  # 0: one block per intermediate channel
def test_decoder_layer_backward_matches_autograd(spec_name, targets, rank, mlp_blocks):
    spec = SPECS[spec_name]
    lora_cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, seq_len=11)
    blocks = mlp_blocks or spec.intermediate_size
    W = random_layer_weights(spec, F64)
    lora = random_lora(spec, lora_cfg, F64)
    x = torch.randn(2, 11, spec.hidden_size, dtype=F64)
    dy = torch.randn_like(x)
    dx, grads = qwen2.decoder_layer_backward(x, dy, W, lora, spec, lora_cfg.scale, blocks)
    assert set(grads) == set(lora)
    names = list(lora)
    refs = vjp(lambda x, *ab: qwen2.decoder_layer_forward(x, W, dict(zip(names, ab)), spec, lora_cfg.scale),
               [x] + [lora[n] for n in names], dy)
    assert rel_err(dx, refs[0]) <= TOL
    for name, ref in zip(names, refs[1:]):
        assert rel_err(grads[name], ref) <= TOL, name
    dx_ad, grads_ad = qwen2.decoder_layer_backward_autodiff(x, dy, W, lora, spec, lora_cfg.scale)
    assert set(grads_ad) == set(lora)
    assert rel_err(dx_ad, refs[0]) <= TOL
    assert all(rel_err(grads_ad[n], r) <= TOL for n, r in zip(names, refs[1:]))
    # and the two backwards against each other, directly
    assert rel_err(dx, dx_ad) <= TOL
    assert all(rel_err(grads[n], grads_ad[n]) <= TOL for n in names)


@pytest.mark.parametrize("mlp_blocks", [1, 3, 96])
def test_structured_forward_equals_forward(mlp_blocks):
    spec = tiny_spec()
    lora_cfg = LoraConfig(rank=4, targets=("q", "o", "down"), seq_len=9)
    W, lora = random_layer_weights(spec, F64), random_lora(spec, lora_cfg, F64)
    x = torch.randn(1, 9, spec.hidden_size, dtype=F64)
    assert rel_err(qwen2.decoder_layer_forward_structured(x, W, lora, spec, 2.0, mlp_blocks),
                   qwen2.decoder_layer_forward(x, W, lora, spec, 2.0)) <= TOL


def _reference_loss(x, norm_w, E, labels):
    logits = qwen2.rms_norm(x, norm_w, 1e-6) @ E.T
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, E.shape[0]), labels[:, 1:].reshape(-1),
                                             ignore_index=head.IGNORE_INDEX)


@pytest.mark.parametrize("max_rows", [320, 64, 100, 7])  # whole, dividing, padded, tiny padded
def test_chunked_loss_head_matches_full_logits(max_rows):
    V, H = 320, 24
    x, norm_w, E = torch.randn(3, 10, H, dtype=F64), torch.randn(H, dtype=F64), torch.randn(V, H, dtype=F64)
    labels = torch.randint(0, V, (3, 10))
    labels[0, torch.randperm(10)[:3]] = -100
    labels[2, :] = -100
    labels[2, 4] = 5  # a row with a single counted target
    loss, dx = head.lm_head_loss(x, norm_w, E, labels, 1e-6, max_rows=max_rows)
    ref_loss = _reference_loss(x, norm_w, E, labels)
    (ref_dx,) = vjp(lambda x: _reference_loss(x, norm_w, E, labels), [x], torch.ones((), dtype=F64))
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert rel_err(dx, ref_dx) <= TOL


@pytest.mark.parametrize("max_rows", [320, 50, 33])
def test_chunked_embedding(max_rows):
    E = torch.randn(320, 8, dtype=F64)
    ids = torch.randint(0, 320, (2, 13))
    assert torch.equal(head.embed(ids, E, max_rows), E[ids])


def _params_and_grads(steps: int = 3):
    params = [torch.randn(4, 3, dtype=F64), torch.randn(5, dtype=F64)]
    return params, [[torch.randn_like(p) for p in params] for _ in range(steps)]


def _torch_optimizer_run(make_optimizer, params, grads_per_step) -> list[torch.Tensor]:
    torch_params = [p.clone().requires_grad_(True) for p in params]
    opt = make_optimizer(torch_params)
    for grads in grads_per_step:
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in torch_params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    params, grads_per_step = _params_and_grads()
    refs = _torch_optimizer_run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=weight_decay),
                                params, grads_per_step)
    ours, m, v = [p.clone() for p in params], [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    step = torch.zeros(1, dtype=F64)
    settings = optim.AdamWSettings(weight_decay=weight_decay)
    for grads in grads_per_step:
        ours, m, v, step = optim.adamw_update(ours, grads, m, v, torch.tensor([1e-2], dtype=F64), step, settings)
    assert step.item() == 3
    for a, b in zip(ours, refs):
        assert rel_err(a, b) <= 1e-12


def test_sgd_matches_torch():
    params, grads_per_step = _params_and_grads()
    refs = _torch_optimizer_run(lambda ps: torch.optim.SGD(ps, lr=1e-2), params, grads_per_step)
    ours = [p.clone() for p in params]
    for grads in grads_per_step:
        ours = optim.sgd_update(ours, grads, torch.tensor([1e-2], dtype=F64))
    for a, b in zip(ours, refs):
        assert rel_err(a, b) <= 1e-12
