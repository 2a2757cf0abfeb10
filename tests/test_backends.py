"""Backends that run here (ExecuTorch, ONNX Runtime): every step graph lowered, run through the backend's
`load` and compared with eager PyTorch (float32, rtol 1e-5); then ONNX-specific checks (opset, IR) and
the ORT training artifacts (checkpoint + optimizer model) against the bundle's optimizer graph.
Core ML bakes weights into per-layer packages: test_backend_coreml.py compares its graphs with eager
(the framework on macOS, the NumPy MIL interpreter elsewhere)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.training")

from exporter import graph_defs as gd  # noqa: E402
from exporter.backends import get_backend  # noqa: E402
from exporter.backends.ort import MAX_IR_VERSION  # noqa: E402
from graphs import head as head_math  # noqa: E402
from graphs import optim as optim_math  # noqa: E402
from graphs.config import LoraConfig  # noqa: E402
from helpers import assert_close, random_layer_weights, random_lora, run_both, runnable_backends, tiny_spec  # noqa: E402,E501

SPEC = tiny_spec()
LORA = LoraConfig(rank=4, seq_len=16)
ROWS = 128  # 320 rows -> 3 chunks of 107, the last one with a padding row


def step_shapes(method: str = "mesp", optimizer: str = "sgd") -> gd.StepShapes:
    return gd.StepShapes(SPEC, LORA, method=method, optimizer=optimizer, vocab_chunk_rows=ROWS)


def _programs() -> dict[str, dict[str, list[gd.GraphDef]]]:
    """variant folder -> program -> graphs (shared graphs are lowered once)."""
    s = step_shapes()
    out = {"common": {"embed": [gd.embed_chunk_graph(s)], "head": [gd.head_chunk_graph(s), gd.head_finish_graph(s)]}}
    for method in gd.METHODS:
        m = step_shapes(method=method)
        out[method] = {"layer": [gd.layer_forward_graph(m), gd.layer_backward_graph(m)]}
    for optimizer in gd.OPTIMIZERS:
        out[optimizer] = {"optimizer": [gd.optimizer_graph(step_shapes(optimizer=optimizer))]}
    return out


def _lower_all(backend_name: str, root) -> dict:
    """(variant, graph id) -> (bundle dir, GraphDef, manifest entry, backend). ExecuTorch on its portable
    kernels (delegate "none"); test_xnnpack.py lowers through XNNPACK."""
    backend = get_backend(backend_name)
    if backend_name == "executorch":
        backend = backend.with_delegate("none")
    out = {}
    for variant, programs in _programs().items():
        folder = root / variant
        for program, defs in programs.items():
            for g, lg in zip(defs, backend.lower(program, defs, folder)):
                entry = json.loads(json.dumps(lg.to_dict()))  # as the manifest stores it
                out[variant, lg.id] = (folder, g, entry, backend)
    return out


@pytest.fixture(scope="module", params=runnable_backends(weights_as_inputs=True))
def lowered(request, tmp_path_factory):
    return _lower_all(request.param, tmp_path_factory.mktemp(f"{request.param}-graphs"))


@pytest.fixture(scope="module")
def ort_lowered(tmp_path_factory):
    return _lower_all("ort", tmp_path_factory.mktemp("ort-graphs"))


def tokens(labels: bool = False) -> torch.Tensor:
    ids = torch.randint(0, SPEC.vocab_size, (LORA.batch, LORA.seq_len))
    ids[0, 0], ids[0, -1] = 0, SPEC.vocab_size - 1  # first and last row of the vocabulary
    if labels:
        ids[0, 3] = ids[0, 9] = head_math.IGNORE_INDEX
    return ids


@pytest.mark.parametrize("name, baked", [("executorch", False), ("ort", False), ("coreml", True)])
def test_registry_and_contract(name, baked):
    backend = get_backend(name)
    assert backend.name == name and backend.weights_in_graphs is baked
    if name == "executorch":  # XNNPACK by default; "none" is the portable kernels
        assert backend.delegate == "xnnpack" and backend.with_delegate("none").delegate == "none"
        assert backend.with_delegate(None) is backend
        with pytest.raises(ValueError, match="unknown delegate"):
            backend.with_delegate("qnn")
    else:
        assert backend.delegate is None and backend.with_delegate(None) is backend
        with pytest.raises(ValueError, match="no delegates"):
            backend.with_delegate("xnnpack")


def test_executorch_programs_hold_methods_with_planned_arenas(lowered):
    folder, _, entry, backend = lowered["mesp", "layer.layer_backward"]
    if backend.name != "executorch":
        pytest.skip("ExecuTorch-specific: programs with methods and planned arenas")
    forward = lowered["mesp", "layer.layer_forward"][2]
    assert entry["file"] == forward["file"] == "graphs/layer.pte"
    assert (entry["method"], forward["method"]) == ("layer_backward", "layer_forward")
    assert entry["arena_bytes"] > 0 and forward["arena_bytes"] > 0


def test_files_are_single_onnx_models_ort_1_19_loads(ort_lowered):
    assert len(ort_lowered) == 1 + 2 + 2 * 2 + 2
    for (variant, gid), (folder, g, entry, _) in ort_lowered.items():
        program, kind = gid.split(".")
        assert entry["file"] == f"graphs/{program}.{kind}.onnx" and entry["method"] == ""
        assert entry["arena_bytes"] is None and "external_data" not in entry
        assert entry["inputs"] == g.signature()["inputs"] and entry["outputs"] == g.signature()["outputs"]
        path = folder / entry["file"]
        model = onnx.load(str(path))
        assert model.ir_version <= MAX_IR_VERSION
        opsets = {o.domain: o.version for o in model.opset_import}
        assert opsets.get("", opsets.get("ai.onnx")) <= 21
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert [i.name for i in model.graph.input] == [t.name for t in g.inputs]
        assert [o.name for o in model.graph.output] == [t.name for t in g.outputs]
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f"{program}.{kind}")) \
            == [f"{program}.{kind}.onnx"]


def test_embed_chunk(lowered):
    C, H = step_shapes().chunk_rows, SPEC.hidden_size
    item = lowered["common", "embed.embed_chunk"]
    for offset in (0, C, 2 * C):
        inputs = [tokens(), torch.randn(C, H), torch.tensor([offset]), torch.randn(LORA.batch, LORA.seq_len, H)]
        got, want = run_both(item, inputs)
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("method", gd.METHODS)
def test_layer_forward_and_backward(lowered, method):
    weights = {k: v.float() for k, v in random_layer_weights(SPEC).items()}
    lora = {k: v.float() for k, v in random_lora(SPEC, LORA).items()}
    frozen = [weights[n] for n in SPEC.layer_weight_shapes()]
    adapters = [lora[n] for n in step_shapes().lora_names()]
    hidden = (LORA.batch, LORA.seq_len, SPEC.hidden_size)
    x, dy = torch.randn(hidden), torch.randn(hidden)

    fwd = lowered[method, "layer.layer_forward"]
    got, want = run_both(fwd, [x, *frozen, *adapters])
    assert_close(got, want, ["y"])

    bwd = lowered[method, "layer.layer_backward"]
    got, want = run_both(bwd, [x, dy, *frozen, *adapters])
    assert all(np.abs(w).max() > 0 for w in want)  # nonzero LoRA: every gradient is exercised
    assert_close(got, want, [t.name for t in bwd[1].outputs])


def test_head_chunks_and_finish(lowered):
    s = step_shapes()
    C, H, V = s.chunk_rows, SPEC.hidden_size, SPEC.vocab_size
    E = torch.randn(C * s.num_chunks, H)
    E[V:] = 0  # padding rows, as the bundle stores them
    x, w = torch.randn(LORA.batch, LORA.seq_len, H), 1 + 0.1 * torch.randn(H)
    labels = tokens(labels=True)
    state = [torch.full(s.tokens, float("-inf")), torch.zeros(s.tokens), torch.zeros(s.hidden), torch.zeros(s.hidden)]
    item = lowered["common", "head.head_chunk"]
    for c in range(s.num_chunks):  # chunk 0 from the fill values, the others from a real previous chunk
        inputs = [x, w, labels, E[c * C:(c + 1) * C], torch.tensor([c * C]), *state]
        got, want = run_both(item, inputs)
        assert_close(got, want, [t.name for t in item[1].outputs])
        state = [torch.from_numpy(t) for t in want]
    assert bool((state[1] > 0).all()) and bool(torch.isfinite(state[0]).all())

    fin = lowered["common", "head.head_finish"]
    got, want = run_both(fin, [x, w, labels, *state])
    assert_close(got, want, ["loss", "dx"])
    # and the loss is the real cross entropy
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + SPEC.rms_norm_eps) * w
    ref = torch.nn.functional.cross_entropy((n @ E[:V].T)[0], head_math.shift_labels(labels)[0])
    np.testing.assert_allclose(got[0][0], ref.item(), rtol=1e-5)


def _optimizer_inputs(optimizer: str, params, grads, m=None, v=None, lr=1e-2, step=0.0):
    head = [torch.tensor([lr])] + ([torch.tensor([step])] if optimizer == "adamw" else [])
    return head + list(params) + list(grads) + (list(m) + list(v) if optimizer == "adamw" else [])


@pytest.mark.parametrize("optimizer", gd.OPTIMIZERS)
def test_optimizer_graph(lowered, optimizer):
    item = lowered[optimizer, "optimizer.optimizer"]
    shapes = list(LORA.layer_lora_shapes(SPEC).values())
    # odd tensors: gradients and moments so small that AdamW's eps (1e-8) decides the update; an
    # exporter that drops `+ eps` (onnxscript's approximate "x + 0" rule does) fails here
    tiny = [1e-8 if i % 2 else 1.0 for i in range(len(shapes))]
    params, grads = [torch.randn(sh) for sh in shapes], [torch.randn(sh) * t for sh, t in zip(shapes, tiny)]
    m = [torch.randn(sh) * 0.1 * t for sh, t in zip(shapes, tiny)]
    v = [torch.rand(sh) * 0.01 * t * t for sh, t in zip(shapes, tiny)]
    got, want = run_both(item, _optimizer_inputs(optimizer, params, grads, m, v, step=3.0))
    if optimizer == "sgd":
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    else:
        assert_close(got, want, [t.name for t in item[1].outputs])
        assert got[-1][0] == 4.0


# ------------------------------------------------------------------------------------ training artifacts

def _lora_state() -> dict[str, torch.Tensor]:
    from exporter import schedule as sched

    return {sched.lora_state_name(i, n): torch.randn(sh) * 0.1
            for i in range(SPEC.num_layers) for n, sh in LORA.layer_lora_shapes(SPEC).items()}


@pytest.fixture(scope="module", params=gd.OPTIMIZERS)
def artifacts(request, tmp_path_factory):
    optimizer = request.param
    out = tmp_path_factory.mktemp(f"ort-training-{optimizer}")
    torch.manual_seed(1)
    state = _lora_state()
    fields = get_backend("ort").write_training_artifacts(step_shapes(optimizer=optimizer), state, out)
    return optimizer, out, state, fields


def test_training_artifacts_files_and_checkpoint(artifacts):
    from onnxruntime.training.api import CheckpointState

    optimizer, out, state, fields = artifacts
    info = fields["ort_training"]
    json.dumps(fields)
    assert info["parameters"] == sorted(state) and info["optimizer"] == optimizer  # ORT lists them sorted
    assert sorted(p.name for p in (out / "training").iterdir()) == ["checkpoint", "optimizer_model.onnx",
                                                                     "training_model.onnx"]
    for key in ("training_model", "optimizer_model"):
        model = onnx.load(str(out / info[key]))
        assert model.ir_version <= MAX_IR_VERSION
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) <= 21
    opt = onnx.load(str(out / info["optimizer_model"]))
    node = {"sgd": "SGDOptimizerV2", "adamw": "AdamWOptimizer"}[optimizer]
    assert [n.op_type for n in opt.graph.node] == [node]
    if optimizer == "adamw":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in opt.graph.node[0].attribute}
        hp = optim_math.AdamWSettings()
        assert attrs["adam_mode"] == 0 and attrs["correct_bias"] == 1
        np.testing.assert_allclose([attrs["alpha"], attrs["beta"], attrs["epsilon"], attrs["weight_decay"]],
                                   [hp.beta1, hp.beta2, hp.eps, hp.weight_decay], rtol=1e-6)

    ckpt = CheckpointState.load_checkpoint(str(out / info["checkpoint"]))
    names = [name for name, _ in ckpt.parameters]
    assert sorted(names) == sorted(state)
    for name, value in state.items():
        p = ckpt.parameters[name]
        assert p.requires_grad
        np.testing.assert_array_equal(p.data, value.numpy())


def _graph_update(lowered, optimizer, layer_params, grads, m, v, lr, step):
    """Our optimizer graph (ONNX, through get_backend("ort").load) for one layer."""
    folder, g, entry, _ = lowered[optimizer, "optimizer.optimizer"]
    outs = get_backend("ort").load(folder, entry)([t.numpy() for t in _optimizer_inputs(optimizer, layer_params, grads, m, v,
                                                                                lr, step)])
    n = len(layer_params)
    if optimizer == "sgd":
        return [torch.from_numpy(o) for o in outs], m, v
    t = [torch.from_numpy(o) for o in outs]
    return t[:n], t[n:2 * n], t[2 * n:3 * n]


def test_ort_training_api_step_matches_optimizer_graph(artifacts, ort_lowered):
    """Module.train_step with the gradient-injection model + Optimizer.step == the bundle's optimizer graph,
    per layer, over two steps (AdamW bias correction depends on the step)."""
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    optimizer, out, state, fields = artifacts
    info = fields["ort_training"]
    ckpt = CheckpointState.load_checkpoint(str(out / info["checkpoint"]))
    module = Module(str(out / info["training_model"]), ckpt, device="cpu")
    opt = Optimizer(str(out / info["optimizer_model"]), module)
    assert module.input_names() == info["gradient_inputs"]
    lr = 2e-2
    opt.set_learning_rate(lr)

    names = info["parameters"]
    layer_names = step_shapes().lora_names()
    ours = {k: v.clone() for k, v in state.items()}
    m = {k: torch.zeros_like(v) for k, v in state.items()}
    v2 = {k: torch.zeros_like(v) for k, v in state.items()}
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        # every other tensor gets tiny gradients, where AdamW's eps matters: ORT's default adam_mode=1
        # (eps not scaled by the bias correction) would differ there by ~2x; mode 0 matches torch
        grads = {k: torch.randn(state[k].shape, generator=gen) * (1e-8 if i % 2 else 1.0)
                 for i, k in enumerate(names)}
        module.train()
        module.lazy_reset_grad()
        module(*[grads[k].numpy() for k in names])
        for k in names:
            np.testing.assert_array_equal(ckpt.parameters[k].grad, grads[k].numpy())  # injected exactly
        opt.step()
        for layer in range(SPEC.num_layers):
            keys = [f"lora.{layer}.{n}" for n in layer_names]
            p, mm, vv = _graph_update(ort_lowered, optimizer, [ours[k] for k in keys], [grads[k] for k in keys],
                                      [m[k] for k in keys], [v2[k] for k in keys], lr, float(step))
            for k, a, b, c in zip(keys, p, mm, vv):
                ours[k], m[k], v2[k] = a, b, c
        for k in names:
            got, want = ckpt.parameters[k].data, ours[k].numpy()
            if optimizer == "sgd":
                np.testing.assert_array_equal(got, want, err_msg=k)
            else:  # float32 1 - beta2^t cancels at small t; ORT and torch round it differently
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=5e-5 * lr, err_msg=k)
    assert not np.array_equal(ckpt.parameters[names[0]].data, state[names[0]].numpy())


def test_optimizer_model_runs_in_plain_inference_session(artifacts, ort_lowered):
    """optimizer_model.onnx also runs without the training API: seq(tensor) inputs, and the kernel updates
    the fed numpy buffers in place (its only graph output is the `updated` flag). `step` here is the
    1-based step (the training API feeds step + 1)."""
    optimizer, out, state, fields = artifacts
    sess = ort.InferenceSession(str(out / fields["ort_training"]["optimizer_model"]),
                                providers=["CPUExecutionProvider"])
    layer_names = step_shapes().lora_names()
    params = [state[f"lora.0.{n}"].numpy().copy() for n in layer_names]
    grads = [np.random.default_rng(3).standard_normal(p.shape).astype(np.float32) for p in params]
    m = [np.full(p.shape, 0.01, np.float32) for p in params]
    v = [np.full(p.shape, 0.002, np.float32) for p in params]
    ref = _graph_update(ort_lowered, optimizer, [torch.from_numpy(p.copy()) for p in params],
                        [torch.from_numpy(g) for g in grads], [torch.from_numpy(x.copy()) for x in m],
                        [torch.from_numpy(x.copy()) for x in v], 1e-2, 4.0)
    feeds = {"learning_rate": np.array([1e-2], np.float32), "step": np.array([5], np.int64),
             "params": params, "gradients": grads, "first_order_moments": m}
    if optimizer == "adamw":
        feeds["second_order_moments"] = v
    feeds = {k: val for k, val in feeds.items() if k in {i.name for i in sess.get_inputs()}}
    (flag,) = sess.run(None, feeds)
    assert bool(flag[0])
    for got, want in zip(params, ref[0]):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=5e-5 * 1e-2)
    assert not np.array_equal(params[0], state["lora.0." + layer_names[0]].numpy())
