"""Every hand-derived backward in graphs/ against torch.autograd on the same forward, in float64.

Reference: torch.autograd.grad of the forward functions (relative error = max|ours - ref| / max|ref|).
The decoder-layer cross product runs over every family (tests/helpers.TINY_FAMILY_SPECS) and each of
its attention kinds; the per-op tests cover the (1 + w) norm, the per-head q/k norm, the RoPE
variants, the sliding-window bands and both gated activations.
"""
from __future__ import annotations

import pytest
import torch

from graphs import head, layer, ops, optim, qwen2
from graphs.config import ALL_TARGETS, LoraConfig, RopeScaling
from graphs.family import get_family
from helpers import TINY_FAMILY_SPECS, random_layer_weights, random_lora, tiny_spec, torch_threads

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


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["w", "1+w"])
@pytest.mark.parametrize("shape", [(2, 5, 32), (2, 3, 5, 16)], ids=["hidden", "per-head-qk"])
def test_rms_norm_backward(offset, shape):
    """Also the q/k norm: (B, heads, S, D) normalized over D with a (D,) weight."""
    x, w = torch.randn(*shape, dtype=F64), torch.randn(shape[-1], dtype=F64) * 0.3
    dy = torch.randn_like(x)
    (ref,) = vjp(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w), [x], dy)
    assert rel_err(ops.rms_norm(x, w, 1e-6, offset), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
                   * (offset + w)) <= TOL
    assert rel_err(ops.rms_norm_backward(x, w, 1e-6, dy, offset), ref) <= TOL


ROPES = {"default": None, "linear": RopeScaling("linear", factor=8.0),
         "llama3": RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=256)}


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_backward(rope):
    cos, sin = ops.rope_cos_sin(7, 16, 10000.0, F64, ROPES[rope])
    x = torch.randn(2, 3, 7, 16, dtype=F64)
    dy = torch.randn_like(x)
    (ref,) = vjp(lambda x: ops.apply_rope(x, cos, sin), [x], dy)
    assert rel_err(ops.apply_rope_backward(dy, cos, sin), ref) <= TOL


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_glu_backward(kind):
    """SwiGLU and GeGLU: act(gate) * up, against torch's silu / gelu(approximate='tanh') under autograd."""
    gate, up = torch.randn(2, 5, 12, dtype=F64) * 2, torch.randn(2, 5, 12, dtype=F64)
    dout = torch.randn_like(gate)
    torch_act = torch.nn.functional.silu if kind == "silu" else (
        lambda z: torch.nn.functional.gelu(z, approximate="tanh"))
    refs = vjp(lambda g, u: torch_act(g) * u, [gate, up], dout)
    out, dgate, dup = ops.glu_backward(gate, up, dout, kind)
    assert rel_err(out, torch_act(gate) * up) <= TOL
    assert rel_err(dgate, refs[0]) <= TOL and rel_err(dup, refs[1]) <= TOL


@pytest.mark.parametrize("S, window", [(9, 2), (9, 3), (11, 4), (12, 4), (9, 9), (9, 20), (9, None)])
@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("query_rows", [None, 2, 5])
def test_banded_attention_matches_masked_attention_and_autograd(S, window, g, query_rows):
    """The block-by-block attention (sliding bands, causal query blocks) and its backward against the full
    (S, S) masked softmax."""
    B, D, scale = 2, 8, 0.37
    q, k, v = torch.randn(B, g, S, D, dtype=F64), torch.randn(B, S, D, dtype=F64), torch.randn(B, S, D, dtype=F64)
    do = torch.randn(B, g, S, D, dtype=F64)
    mask = ops.causal_mask(S) if window is None else ops.sliding_mask(S, window)
    if window is not None:  # the mask itself: query i sees keys i - window < j <= i
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        assert torch.equal(~mask, (j <= i) & (j > i - window))

    def reference(q, k, v):
        p = torch.softmax((q @ k.unsqueeze(1).transpose(-1, -2) * scale).masked_fill(mask, float("-inf")), dim=-1)
        return p @ v.unsqueeze(1)

    assert rel_err(ops.group_attention(q, k, v, scale, window, query_rows), reference(q, k, v)) <= TOL
    refs = vjp(reference, [q, k, v], do)
    for ours, ref in zip(ops.group_attention_backward(q, k, v, do, scale, window, query_rows), refs):
        assert rel_err(ours, ref) <= TOL


def test_query_blocks_cover_every_causal_score_once():
    """Causal query blocks: at most query_rows x S scores each, every score below the diagonal in exactly one."""
    for S, rows in [(256, 128), (1024, 128), (9, 4), (9, 1)]:
        blocks = ops.attention_blocks(S, None, rows)
        count = torch.zeros(S, S, dtype=torch.int64)
        for qs, ks in blocks:
            assert qs.stop - qs.start <= rows and ks.start == 0 and ks.stop == qs.stop
            count[qs, ks] += 1
        assert torch.equal(count.tril() > 0, ~ops.causal_mask(S)) and count.max() == 1


def test_sliding_bands_grow_with_the_window_not_the_sequence():
    """Scores computed per sliding layer: at most window x (2 window - 1) per band, 2 S window in all."""
    for S, W in [(256, 16), (1024, 16), (4096, 512)]:
        bands = ops.attention_blocks(S, W)
        sizes = [(qs.stop - qs.start) * (ks.stop - ks.start) for qs, ks in bands]
        assert max(sizes) <= W * (2 * W - 1) and sum(sizes) <= 2 * S * W
        covered = torch.zeros(S, S, dtype=torch.bool)
        for qs, ks in bands:
            covered[qs, ks] = True
        assert not (~ops.sliding_mask(S, W) & ~covered).any()  # every unmasked score is in some band


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
    assert rel_err(qwen2.causal_attention(q, k.unsqueeze(1), v.unsqueeze(1)), attn(q, k, v)) <= TOL


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


# (spec, attention kind): the Qwen2 head layouts, then every family at each of its attention kinds.
SPECS = {
    "gqa": (tiny_spec(), None),
    "mha": (tiny_spec(num_heads=4, num_kv_heads=4, hidden_size=32, intermediate_size=40), None),
    "mqa": (tiny_spec(num_heads=6, num_kv_heads=1, hidden_size=48, intermediate_size=72), None),
    **{f"{fam}-{kind.split('_')[0]}": (spec, kind) for fam, spec in TINY_FAMILY_SPECS.items() if fam != "qwen2"
       for kind in spec.attention_kinds},
}
TARGET_SETS = [ALL_TARGETS, ("q", "v"), ("down",), ("o", "gate")]


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=["-".join(t) for t in TARGET_SETS])
@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("mlp_blocks", [1, 3, 0])  # 0: one block per intermediate channel
def test_decoder_layer_backward_matches_autograd(spec_name, targets, rank, mlp_blocks):
    spec, kind = SPECS[spec_name]
    lora_cfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets, seq_len=11)
    blocks = mlp_blocks or spec.intermediate_size
    W = random_layer_weights(spec, F64)
    lora = random_lora(spec, lora_cfg, F64)
    x = torch.randn(2, 11, spec.hidden_size, dtype=F64)  # 11 > the gemma3 sliding window (5)
    dy = torch.randn_like(x)
    query_rows = {1: None, 3: 4, 0: 1}[mlp_blocks]  # all queries at once, blocks of 4 of 11, one by one
    dx, grads = layer.decoder_layer_backward(x, dy, W, lora, spec, lora_cfg.scale, blocks, kind, query_rows)
    assert set(grads) == set(lora)
    names = list(lora)
    refs = vjp(lambda x, *ab: layer.decoder_layer_forward(x, W, dict(zip(names, ab)), spec, lora_cfg.scale, kind),
               [x] + [lora[n] for n in names], dy)
    assert rel_err(dx, refs[0]) <= TOL
    for name, ref in zip(names, refs[1:]):
        assert rel_err(grads[name], ref) <= TOL, name
    dx_ad, grads_ad = layer.decoder_layer_backward_autodiff(x, dy, W, lora, spec, lora_cfg.scale, kind)
    assert set(grads_ad) == set(lora)
    assert rel_err(dx_ad, refs[0]) <= TOL
    assert all(rel_err(grads_ad[n], r) <= TOL for n, r in zip(names, refs[1:]))
    # and the two backwards against each other, directly
    assert rel_err(dx, dx_ad) <= TOL
    assert all(rel_err(grads[n], grads_ad[n]) <= TOL for n in names)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("mlp_blocks", [1, 3, 96])
def test_structured_forward_equals_forward(spec_name, mlp_blocks):
    spec, kind = SPECS[spec_name]
    lora_cfg = LoraConfig(rank=4, targets=("q", "o", "down"), seq_len=9)
    W, lora = random_layer_weights(spec, F64), random_lora(spec, lora_cfg, F64)
    x = torch.randn(1, 9, spec.hidden_size, dtype=F64)
    query_rows = {1: None, 3: 2, 96: 5}[mlp_blocks]
    assert rel_err(layer.decoder_layer_forward_structured(x, W, lora, spec, 2.0, mlp_blocks, kind, query_rows),
                   layer.decoder_layer_forward(x, W, lora, spec, 2.0, kind)) <= TOL


@pytest.mark.parametrize("fn", ["backward", "forward_structured", "forward", "backward_autodiff"])
def test_sliding_layer_never_forms_sequence_by_sequence_scores(fn, monkeypatch):
    """Every score block a sliding layer computes spans at most `window` queries x (2 window - 1) keys."""
    spec = TINY_FAMILY_SPECS["gemma3"]
    S, W = 23, spec.sliding_window
    shapes = []
    real = ops.attention_probs

    def spy(q, k, mask, scale=None):
        shapes.append(mask.shape)
        return real(q, k, mask, scale)

    monkeypatch.setattr(ops, "attention_probs", spy)
    weights = random_layer_weights(spec, F64)
    lora = random_lora(spec, LoraConfig(rank=2, seq_len=S), F64)
    x = torch.randn(1, S, spec.hidden_size, dtype=F64)
    args = {"backward": (x, torch.randn_like(x)), "backward_autodiff": (x, torch.randn_like(x))}.get(fn, (x,))
    getattr(layer, f"decoder_layer_{fn}")(*args, weights, lora, spec, 2.0, attention="sliding_attention")
    assert shapes and all(q <= W and k <= 2 * W - 1 for q, k in shapes), shapes


@pytest.mark.parametrize("fn", ["backward", "forward_structured"])
def test_structured_causal_layer_scores_one_query_block_at_a_time(fn, monkeypatch):
    """The structured (mesp) layer computes at most query_rows x S scores at once: no S x S matrix."""
    spec = TINY_FAMILY_SPECS["qwen2"]
    S, rows = 23, 5
    shapes = []
    real = ops.attention_probs

    def spy(q, k, mask, scale=None):
        shapes.append(tuple(q.shape[-2:-1]) + tuple(k.shape[-2:-1]))
        return real(q, k, mask, scale)

    monkeypatch.setattr(ops, "attention_probs", spy)
    weights = random_layer_weights(spec, F64)
    lora = random_lora(spec, LoraConfig(rank=2, seq_len=S), F64)
    x = torch.randn(1, S, spec.hidden_size, dtype=F64)
    args = (x, torch.randn_like(x)) if fn == "backward" else (x,)
    getattr(layer, f"decoder_layer_{fn}")(*args, weights, lora, spec, 2.0, 2, None, rows)
    assert shapes and all(q <= rows and k <= S for q, k in shapes), shapes
    passes = 3 if fn == "backward" else 1  # the backward: forward, o recomputed, then the gradient
    assert sum(q for q, _ in shapes) == S * spec.num_kv_heads * passes


def test_sliding_layer_differs_from_full_layer():
    """The window matters: the same gemma3 weights give different outputs as a sliding and a full layer."""
    spec = TINY_FAMILY_SPECS["gemma3"]
    W, x = random_layer_weights(spec, F64), torch.randn(1, 11, spec.hidden_size, dtype=F64)
    y_sliding = layer.decoder_layer_forward(x, W, {}, spec, 2.0, "sliding_attention")
    y_full = layer.decoder_layer_forward(x, W, {}, spec, 2.0, "full_attention")
    assert rel_err(y_sliding[:, :5], y_full[:, :5]) > 1e-3  # RoPE differs (base 100 vs 10000 / 4)
    with pytest.raises(ValueError, match="mixes"):
        layer.decoder_layer_forward(x, W, {}, spec, 2.0)


def _reference_loss(x, norm_w, E, labels, offset=0.0):
    logits = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + norm_w)) @ E.T
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, E.shape[0]), labels[:, 1:].reshape(-1),
                                             ignore_index=head.IGNORE_INDEX)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["w", "1+w"])
@pytest.mark.parametrize("max_rows", [320, 64, 100, 7])  # whole, dividing, padded, tiny padded
def test_chunked_loss_head_matches_full_logits(max_rows, offset):
    V, H = 320, 24
    x, norm_w, E = torch.randn(3, 10, H, dtype=F64), torch.randn(H, dtype=F64), torch.randn(V, H, dtype=F64)
    labels = torch.randint(0, V, (3, 10))
    labels[0, torch.randperm(10)[:3]] = -100
    labels[2, :] = -100
    labels[2, 4] = 5  # a row with a single counted target
    loss, dx = head.lm_head_loss(x, norm_w, E, labels, 1e-6, max_rows=max_rows, norm_offset=offset)
    ref_loss = _reference_loss(x, norm_w, E, labels, offset)
    (ref_dx,) = vjp(lambda x: _reference_loss(x, norm_w, E, labels, offset), [x], torch.ones((), dtype=F64))
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


def _by_calls(x, dy, W, lora, spec, kind, scale, blocks, query_rows):
    """The layer's forward and backward composed of `graphs.sublayer` calls, as a split schedule runs them."""
    from graphs import sublayer

    J_all = list(ops.blocks(spec.intermediate_size, blocks))
    h1 = sublayer.attention_forward(x, W, lora, spec, scale, kind, query_rows)
    z = sum(sublayer.mlp_block_forward(h1, *sublayer.block_tensors(W, lora, J), spec, scale, kind) for J in J_all)
    y = sublayer.mlp_finish(h1, z, W, spec, kind)
    has_out_norm = get_family(spec.family).norm("mlp_out") is not None
    dz = sublayer.mlp_out_backward(z, dy, W, spec, kind) if has_out_norm else dy
    dm, grads = 0, {}
    for J in J_all:
        dm_J, g = sublayer.mlp_block_backward(h1, dz, *sublayer.block_tensors(W, lora, J), spec, scale, kind)
        dm = dm + dm_J
        for name, t in g.items():  # sums over blocks; block-owned rows / columns concatenated
            if name in sublayer.ROW_BLOCKED_LORA + sublayer.COL_BLOCKED_LORA:
                grads.setdefault(name, []).append(t)
            else:
                grads[name] = grads.get(name, 0) + t
    grads = {n: torch.cat(t, dim=1 if n.endswith("lora_A") else 0) if isinstance(t, list) else t
             for n, t in grads.items()}
    dh1 = sublayer.mlp_backward_finish(h1, dm, dy, W, spec, kind)
    dx, attn_grads = sublayer.attention_backward(x, dh1, W, lora, spec, scale, kind, query_rows)
    return y, dx, {**grads, **attn_grads}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=["-".join(t) for t in TARGET_SETS])
@pytest.mark.parametrize("blocks", [1, 4])
def test_sublayer_calls_match_autograd(spec_name, targets, blocks):
    """Attention call, MLP channel-block calls and their finishing calls give the layer's y, dx and every
    LoRA gradient (float64 autograd of the plain layer)."""
    spec, kind = SPECS[spec_name]
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=targets, seq_len=11)
    W, lora = random_layer_weights(spec, F64), random_lora(spec, lora_cfg, F64)
    x = torch.randn(2, 11, spec.hidden_size, dtype=F64)
    dy = torch.randn_like(x)
    y, dx, grads = _by_calls(x, dy, W, lora, spec, kind, lora_cfg.scale, blocks, 4)
    assert set(grads) == set(lora)
    names = list(lora)
    assert rel_err(y, layer.decoder_layer_forward(x, W, lora, spec, lora_cfg.scale, kind)) <= TOL
    refs = vjp(lambda x, *ab: layer.decoder_layer_forward(x, W, dict(zip(names, ab)), spec, lora_cfg.scale, kind),
               [x] + [lora[n] for n in names], dy)
    assert rel_err(dx, refs[0]) <= TOL
    for name, ref in zip(names, refs[1:]):
        assert rel_err(grads[name], ref) <= TOL, name
