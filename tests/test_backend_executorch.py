"""ExecuTorch backend: every step graph lowered into `.pte` programs (graphs as methods), run through
`BACKEND.load` on the ExecuTorch Python runtime against eager PyTorch."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime")

from exporter import graph_defs as gd  # noqa: E402
from exporter.backends import get_backend  # noqa: E402
from exporter.backends.executorch import BACKEND, ExecuTorchBackend  # noqa: E402
from graphs import head as head_math  # noqa: E402
from graphs.config import LoraConfig  # noqa: E402
from helpers import random_layer_weights, random_lora, tiny_spec  # noqa: E402

SPEC = tiny_spec()
LORA = LoraConfig(rank=4, seq_len=16)
ROWS = 128  # 320 rows -> 3 chunks of 107, the last one with a padding row
RTOL = 1e-5
_SCALAR_TYPES = {"float32": 6, "int64": 4}  # ExecuTorch ScalarType codes


def step_shapes(method: str = "mesp", optimizer: str = "sgd") -> gd.StepShapes:
    return gd.StepShapes(SPEC, LORA, method=method, optimizer=optimizer, vocab_chunk_rows=ROWS)


def _programs() -> dict[str, dict[str, list[gd.GraphDef]]]:
    """variant folder -> program -> graphs. embed and head do not depend on the method or the optimizer, so
    they are lowered once; layer once per method, optimizer once per optimizer."""
    s = step_shapes()
    out = {"common": {"embed": [gd.embed_chunk_graph(s)], "head": [gd.head_chunk_graph(s), gd.head_finish_graph(s)]}}
    for method in gd.METHODS:
        m = step_shapes(method=method)
        out[method] = {"layer": [gd.layer_forward_graph(m), gd.layer_backward_graph(m)]}
    for optimizer in gd.OPTIMIZERS:
        out[optimizer] = {"optimizer": [gd.optimizer_graph(step_shapes(optimizer=optimizer))]}
    return out


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(variant, graph id) -> (bundle dir, GraphDef, manifest entry)."""
    root = tmp_path_factory.mktemp("et-bundle")
    out = {}
    for variant, programs in _programs().items():
        folder = root / variant
        for program, defs in programs.items():
            lgs = BACKEND.lower(program, defs, folder)
            assert [lg.id for lg in lgs] == [f"{program}.{g.kind}" for g in defs]
            for g, lg in zip(defs, lgs):
                entry = json.loads(json.dumps(lg.to_dict()))  # as the manifest stores it
                out[variant, lg.id] = (folder, g, entry)
    return out


def run_both(item, inputs: list[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    folder, g, entry = item
    got = BACKEND.load(folder, entry)([t.numpy() for t in inputs])
    with torch.no_grad():
        want = [t.numpy() for t in g.module(*inputs)]
    assert len(got) == len(want) == len(entry["outputs"])
    for o, spec in zip(got, entry["outputs"]):
        assert list(o.shape) == spec["shape"] and o.dtype == np.dtype(spec["dtype"])
    return got, want


def assert_close(got, want, names, atol=1e-6, atol_scale=0.0):
    """rtol 1e-5; atol `atol` plus `atol_scale` of the output's largest magnitude (matmul-heavy graphs: the
    runtime's float32 accumulation order differs from torch's by a few 1e-6 of the largest value)."""
    for g, w, n in zip(got, want, names):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=atol + atol_scale * float(np.abs(w).max()), err_msg=n)


def tokens(labels: bool = False) -> torch.Tensor:
    ids = torch.randint(0, SPEC.vocab_size, (LORA.batch, LORA.seq_len))
    ids[0, 0], ids[0, -1] = 0, SPEC.vocab_size - 1  # first and last row of the vocabulary
    if labels:
        ids[0, 3] = ids[0, 9] = head_math.IGNORE_INDEX
    return ids


def layer_inputs(shapes: gd.StepShapes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    weights = {k: v.float() for k, v in random_layer_weights(SPEC).items()}
    lora = {k: v.float() for k, v in random_lora(SPEC, LORA).items()}
    frozen = [weights[n] for n in SPEC.layer_weight_shapes()]
    adapters = [lora[n] for n in shapes.lora_names()]
    x, dy = torch.randn(shapes.hidden), torch.randn(shapes.hidden)
    return [x, *frozen, *adapters], [x, dy, *frozen, *adapters]


# ------------------------------------------------------------------------------------------ the files

def test_registry_and_contract():
    assert get_backend("executorch") is BACKEND
    assert isinstance(BACKEND, ExecuTorchBackend)
    assert BACKEND.name == "executorch" and BACKEND.weights_in_graphs is False


def test_one_pte_per_program_with_graphs_as_methods(lowered):
    from executorch.runtime import Runtime

    assert len(lowered) == 1 + 2 + 2 * 2 + 2
    files = {}
    for (variant, gid), (folder, g, entry) in lowered.items():
        program, kind = gid.split(".")
        assert kind == g.kind and entry["method"] == kind and entry["file"] == f"graphs/{program}.pte"
        assert entry["inputs"] == g.signature()["inputs"] and entry["outputs"] == g.signature()["outputs"]
        files.setdefault(folder / entry["file"], set()).add(kind)
    (root,) = {folder.parent for folder, _, _ in lowered.values()}
    for variant, programs in _programs().items():  # nothing but one .pte per program
        graphs_dir = root / variant / "graphs"
        assert sorted(p.name for p in graphs_dir.iterdir()) == sorted(f"{name}.pte" for name in programs)
    for path, kinds in files.items():
        assert Runtime.get().load_program(path).method_names == kinds


def test_method_meta_matches_the_signature_and_inputs_are_not_planned(lowered):
    """What the app reads from the .pte agrees with the manifest; inputs are the app's buffers (unplanned),
    outputs live in the planned arena."""
    from executorch.runtime import Runtime

    programs = {}
    for (folder, g, entry) in lowered.values():
        path = folder / entry["file"]
        if path not in programs:
            programs[path] = Runtime.get().load_program(path)
        meta = programs[path].metadata(entry["method"])
        assert meta.num_inputs() == len(entry["inputs"]) and meta.num_outputs() == len(entry["outputs"])
        for i, spec in enumerate(entry["inputs"]):
            info = meta.input_tensor_meta(i)
            assert list(info.sizes()) == spec["shape"] and int(info.dtype()) == _SCALAR_TYPES[spec["dtype"]]
            assert not info.is_memory_planned()
        out_bytes = 0
        for i, spec in enumerate(entry["outputs"]):
            info = meta.output_tensor_meta(i)
            assert list(info.sizes()) == spec["shape"] and int(info.dtype()) == _SCALAR_TYPES[spec["dtype"]]
            assert info.is_memory_planned()
            out_bytes += info.nbytes()
        assert isinstance(entry["arena_bytes"], int) and entry["arena_bytes"] >= out_bytes > 0


def test_planned_arenas_mesp_below_mebp(lowered):
    """MeSP's structured layer plans less activation memory than MeBP's autodiff layer (already at the tiny
    spec; at Qwen2.5-0.5B, seq 256: 23.5 MB vs 111.7 MB for layer_backward)."""
    arena = {(m, k): lowered[m, f"layer.{k}"][2]["arena_bytes"] for m in gd.METHODS
             for k in ("layer_forward", "layer_backward")}
    print("planned arena bytes (tiny spec):", {f"{m}.{k}": v for (m, k), v in arena.items()})
    assert all(v > 0 for v in arena.values())
    assert arena["mesp", "layer_backward"] < arena["mebp", "layer_backward"]
    assert arena["mesp", "layer_forward"] < arena["mebp", "layer_forward"]


# ------------------------------------------------------------------------------------------ the math

def test_embed_chunk(lowered):
    C, H = step_shapes().chunk_rows, SPEC.hidden_size
    item = lowered["common", "embed.embed_chunk"]
    for offset in (0, C, 2 * C):
        inputs = [tokens(), torch.randn(C, H), torch.tensor([offset]), torch.randn(LORA.batch, LORA.seq_len, H)]
        got, want = run_both(item, inputs)
        np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("method", gd.METHODS)
def test_layer_forward_and_backward(lowered, method):
    fwd_in, bwd_in = layer_inputs(step_shapes(method))

    fwd = lowered[method, "layer.layer_forward"]
    got, want = run_both(fwd, fwd_in)
    assert_close(got, want, ["y"], atol_scale=1e-5)

    bwd = lowered[method, "layer.layer_backward"]
    got, want = run_both(bwd, bwd_in)
    assert all(np.abs(w).max() > 0 for w in want)  # nonzero LoRA: every gradient is exercised
    assert_close(got, want, [t.name for t in bwd[1].outputs], atol_scale=1e-5)


def test_head_chunks_and_finish(lowered):
    s = step_shapes()
    C, H, V = s.chunk_rows, SPEC.hidden_size, SPEC.vocab_size
    E = torch.randn(C * s.num_chunks, H)
    E[V:] = 0  # padding rows, as the bundle stores them
    x, w = torch.randn(LORA.batch, LORA.seq_len, H), 1 + 0.1 * torch.randn(H)
    labels = tokens(labels=True)
    state = list(head_math.head_init_state(LORA.batch, LORA.seq_len, H))
    item = lowered["common", "head.head_chunk"]
    for c in range(s.num_chunks):  # chunk 0 from the fill values (mu = -inf), the others from a real state
        inputs = [x, w, labels, E[c * C:(c + 1) * C], torch.tensor([c * C]), *state]
        got, want = run_both(item, inputs)
        assert_close(got, want, [t.name for t in item[1].outputs], atol_scale=1e-6)
        assert np.isfinite(got[0]).all() and (got[1] > 0).all()
        state = [torch.from_numpy(t) for t in want]

    finish = lowered["common", "head.head_finish"]
    got, want = run_both(finish, [x, w, labels, *state])
    assert_close(got, want, ["loss", "dx"], atol_scale=1e-6)
    ref = torch.nn.functional.cross_entropy((head_math.rms_norm(x, w, SPEC.rms_norm_eps) @ E[:V].T)[:, :-1].flatten(0, 1),
                                            labels[:, 1:].flatten(), ignore_index=head_math.IGNORE_INDEX)
    np.testing.assert_allclose(got[0][0], ref.item(), rtol=1e-5)


@pytest.mark.parametrize("optimizer", gd.OPTIMIZERS)
def test_optimizer(lowered, optimizer):
    folder, g, entry = item = lowered[optimizer, "optimizer.optimizer"]
    inputs = []
    for spec in g.inputs:
        if spec.name == "lr":
            inputs.append(torch.tensor([1e-2]))
        elif spec.name == "step":
            inputs.append(torch.tensor([3.0]))
        elif spec.name.startswith("exp_avg_sq_"):
            inputs.append(torch.rand(spec.shape) * 1e-2)  # second moments are nonnegative
        else:
            inputs.append(torch.randn(spec.shape) * 0.1)
    got, want = run_both(item, inputs)
    assert_close(got, want, [t.name for t in g.outputs])
    if optimizer == "adamw":
        assert got[-1][0] == 4.0


# ------------------------------------------------------------------------------------------ load

def test_load_converts_inputs_and_checks_them(lowered):
    folder, g, entry = item = lowered["common", "embed.embed_chunk"]
    C, H = step_shapes().chunk_rows, SPEC.hidden_size
    ids, weight, acc = tokens(), torch.randn(C, H), torch.randn(LORA.batch, LORA.seq_len, H)
    _, want = run_both(item, [ids, weight, torch.tensor([C]), acc])
    fn = BACKEND.load(folder, entry)
    # int32 ids and offset, a non-contiguous weight view and a read-only acc are converted, not misread
    weight_t = np.asfortranarray(weight.numpy())
    acc_ro = acc.numpy().copy()
    acc_ro.setflags(write=False)
    got = fn([ids.numpy().astype(np.int32), weight_t, np.array([C], dtype=np.int32), acc_ro])
    np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(ValueError, match="expected 4 inputs"):
        fn([ids.numpy(), weight.numpy(), np.array([C])])
    with pytest.raises(ValueError, match="input weight has shape"):
        fn([ids.numpy(), weight.numpy()[:-1], np.array([C]), acc.numpy()])
    with pytest.raises(RuntimeError, match="no method"):
        BACKEND.load(folder, {**entry, "method": "nope"})


def test_programs_are_cached_and_reloaded_when_the_file_changes(lowered, tmp_path):
    sgd_folder, _, sgd_entry = lowered["sgd", "optimizer.optimizer"]
    adamw_folder, adamw_def, adamw_entry = lowered["adamw", "optimizer.optimizer"]
    backend = ExecuTorchBackend()
    target = tmp_path / sgd_entry["file"]
    target.parent.mkdir(parents=True)
    shutil.copy(sgd_folder / sgd_entry["file"], target)
    backend.load(tmp_path, sgd_entry)
    first = backend._program(target)
    assert backend._program(target) is first  # one load per file
    shutil.copy(adamw_folder / adamw_entry["file"], target)  # re-lowered in place: a different program
    inputs = [torch.tensor([1e-2]), torch.tensor([0.0])] + [torch.randn(t.shape).abs() * 0.1 for t in adamw_def.inputs[2:]]
    got = backend.load(tmp_path, adamw_entry)([t.numpy() for t in inputs])
    assert backend._program(target) is not first
    with torch.no_grad():
        want = [t.numpy() for t in adamw_def.module(*inputs)]
    assert_close(got, want, [t.name for t in adamw_def.outputs])
