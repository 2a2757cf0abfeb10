"""Core ML backend: per-program multifunction packages converted on any OS (`skip_model_load=True`), their
functions and signatures read back from the protobuf, a layer's frozen weights stored once for its
forward and backward functions, layer packages written from a template equal to converted ones, and
predictions against eager PyTorch, parametrized over the runtimes that run Core ML bundles: `mil` (the
NumPy MIL interpreter, any OS) and `coreml` (the Core ML framework, macOS only)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from exporter import graph_defs as gd  # noqa: E402
from exporter.backends import get_backend  # noqa: E402
from exporter.backends.base import RuntimeUnavailable  # noqa: E402
from exporter.backends import coreml_exact  # noqa: E402
from exporter.backends.coreml import (BACKEND, MIL_RUNTIME, WEIGHTS_BIN, CoreMLBackend, describe_package,  # noqa: E402
                                      where_fill_to_masked_fill)
from exporter.backends.mil_ops import OPS  # noqa: E402
from exporter.backends.mil_runtime import load_program  # noqa: E402
from graphs import head as head_math  # noqa: E402
from graphs.config import LoraConfig  # noqa: E402
from helpers import assert_close, random_layer_weights, random_lora, run_both, tiny_spec  # noqa: E402

SPEC = tiny_spec()
LORA = LoraConfig(rank=4, seq_len=16)
ROWS = 128  # 320 rows -> 3 chunks of 107, the last one with a padding row
RTOL = {"coreml": 1e-4, "mil": 1e-5}  # the interpreter computes in float32 as eager does
SHARED_WEIGHTS_SLACK = 1.15
INT_INPUTS = {"input_ids", "labels", "offset"}
off_macos = pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs here")
FRAMEWORK = CoreMLBackend(interpreter=False)


@pytest.fixture(params=["coreml", "mil"])
def runtime(request):
    """(name, backend whose `load` runs Core ML functions): the framework (macOS) and the interpreter."""
    if request.param == "coreml" and sys.platform != "darwin":
        pytest.skip("the Core ML framework runs on macOS only (the `mil` case runs these graphs here)")
    return request.param, FRAMEWORK if request.param == "coreml" else MIL_RUNTIME


def step_shapes(method: str = "mesp", optimizer: str = "sgd") -> gd.StepShapes:
    return gd.StepShapes(SPEC, LORA, method=method, optimizer=optimizer, vocab_chunk_rows=ROWS)


def _programs() -> dict[str, dict[str, list[gd.GraphDef]]]:
    """variant folder -> program -> graphs. Layer programs bake one layer's (random) weights."""
    s = step_shapes()
    torch.manual_seed(0)
    weights = {k: v.float() for k, v in random_layer_weights(SPEC).items()}
    out = {"common": {"embed": [gd.embed_chunk_graph(s)], "head": [gd.head_chunk_graph(s), gd.head_finish_graph(s)]}}
    for method in gd.METHODS:
        m = step_shapes(method=method)
        out[method] = {"layer_00": [gd.layer_forward_graph(m, weights), gd.layer_backward_graph(m, weights)]}
    for optimizer in gd.OPTIMIZERS:
        out[optimizer] = {"optimizer": [gd.optimizer_graph(step_shapes(optimizer=optimizer))]}
    return out


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(variant, graph id) -> (bundle dir, GraphDef, manifest entry)."""
    root = tmp_path_factory.mktemp("coreml-bundle")
    out = {}
    for variant, programs in _programs().items():
        folder = root / variant
        for program, defs in programs.items():
            for g, lg in zip(defs, BACKEND.lower(program, defs, folder)):
                entry = json.loads(json.dumps(lg.to_dict()))  # as the manifest stores it
                entry["constant_bytes"] = sum(t.numel() * t.element_size() for t in g.constants.values())
                out[variant, lg.id] = (folder, g, entry)
    return out


def test_registry_and_contract():
    assert get_backend("coreml") is BACKEND
    assert BACKEND.name == "coreml" and BACKEND.weights_in_graphs is True


def test_one_multifunction_package_per_program(lowered):
    assert len(lowered) == 1 + 2 + 2 * 2 + 2
    by_file: dict = {}
    for (variant, gid), (folder, g, entry) in lowered.items():
        program, kind = gid.split(".")
        assert kind == g.kind and entry["method"] == kind and entry["arena_bytes"] is None
        assert entry["file"] == f"graphs/{program}.mlpackage"
        by_file.setdefault(folder / entry["file"], []).append(kind)
    for folder in {path.parent for path in by_file}:  # no leftovers (single-function packages) next to them
        assert sorted(folder.iterdir()) == sorted(path for path in by_file if path.parent == folder)
    for path, kinds in by_file.items():
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        assert set(files) <= {"Manifest.json", "Data/com.apple.CoreML/model.mlmodel", WEIGHTS_BIN}
        described = describe_package(path)
        assert list(described["functions"]) == kinds  # one function per graph, in program order
        assert described["default_function"] == kinds[0]


def test_signatures_match_graph_defs(lowered):
    """Core ML names, shapes and dtypes are the GraphDef's, except int64 -> int32, which the entry records."""
    for (variant, gid), (folder, g, entry) in lowered.items():
        fn = describe_package(folder / entry["file"])["functions"][entry["method"]]
        assert fn["inputs"] == entry["inputs"], gid
        assert fn["outputs"] == entry["outputs"] == g.signature()["outputs"], gid
        want = [{**t, "dtype": "int32" if t["dtype"] == "int64" else t["dtype"]} for t in g.signature()["inputs"]]
        assert entry["inputs"] == want, gid
        assert {t["name"] for t in entry["inputs"] if t["dtype"] == "int32"} <= INT_INPUTS
        assert all(t["dtype"] == "float32" for t in entry["outputs"])
    ints = {gid: [t["name"] for t in e["inputs"] if t["dtype"] == "int32"] for (_, gid), (_, _, e) in lowered.items()}
    assert ints["embed.embed_chunk"] == ["input_ids", "offset"]
    assert ints["head.head_chunk"] == ["labels", "offset"] and ints["head.head_finish"] == ["labels"]


@pytest.mark.parametrize("method", gd.METHODS)
def test_layer_weights_are_constants_stored_once(lowered, method):
    fwd, bwd = lowered[method, "layer_00.layer_forward"], lowered[method, "layer_00.layer_backward"]
    frozen = {gd.ident(n) for n in SPEC.layer_weight_shapes()}
    assert [t["name"] for t in fwd[2]["inputs"]] == ["x", *[t.name for t in gd.lora_inputs(step_shapes(method))]]
    assert not frozen & {t["name"] for t in bwd[2]["inputs"]}
    constants = fwd[2]["constant_bytes"]
    assert constants == bwd[2]["constant_bytes"] == sum(4 * np.prod(s) for s in SPEC.layer_weight_shapes().values())
    stored = describe_package(fwd[0] / fwd[2]["file"])["weight_bin_bytes"]
    # once, plus a little (64-byte alignment, the causal mask, zero biases); twice would be >= 2.0
    assert 1.0 <= stored / constants <= SHARED_WEIGHTS_SLACK, (stored, constants)


def test_where_fill_rewrite_keeps_values(lowered):
    """`where(c, fill, x)` -> `masked_fill`, so that Core ML stores no broadcast fill constant: same outputs."""
    for key, rewrites in ((("common", "embed.embed_chunk"), 1), (("common", "head.head_chunk"), 1),
                          (("mebp", "layer_00.layer_backward"), 2), (("common", "head.head_finish"), 0)):
        g = lowered[key][1]
        exported = torch.export.export(g.module, g.example_inputs()).run_decompositions({})
        inputs = [torch.tensor([ROWS]) if t.name == "offset" else tokens(labels=True) if t.dtype == "int64"
                  else torch.randn(t.shape) for t in g.inputs]
        before = exported.module()(*inputs)
        assert where_fill_to_masked_fill(exported) == rewrites, key
        assert rewrites == 0 or torch.ops.aten.where.self not in {n.target for n in exported.graph.nodes}
        for a, b in zip(before, exported.module()(*inputs)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    # the embed and head packages hold no constant at all
    for key in (("common", "embed.embed_chunk"), ("common", "head.head_chunk")):
        folder, _, entry = lowered[key]
        assert describe_package(folder / entry["file"])["weight_bin_bytes"] == 0


def test_runtime_harness_offline_check_accepts_packages(lowered):
    from runtime_harness.coreml_check import verify_coreml_offline

    for variant in ("mesp", "common"):
        entries = {gid: e for (v, gid), (_, _, e) in lowered.items() if v == variant}
        folder = next(f for (v, _), (f, _, _) in lowered.items() if v == variant)
        report = verify_coreml_offline(folder, {"graphs": entries, "files": {}})
        assert report["ok"], report["lines"]
    bad = json.loads(json.dumps(entries))
    bad["embed.embed_chunk"]["inputs"][0]["dtype"] = "int64"
    report = verify_coreml_offline(folder, {"graphs": bad, "files": {}})
    assert not report["ok"] and "embed_chunk inputs differ" in report["problems"][0]


def test_bundle_builds_and_verifies(tiny_checkpoint, tmp_path, capsys):
    """`build` + `runtime_harness verify`: the replayed step's gradients (the Core ML framework on macOS, the
    MIL interpreter elsewhere; `--runtime mil` anywhere) plus the structure checks (checksums, signatures,
    shared weights). mebp + AdamW here; mesp + SGD in test_harness.py."""
    from exporter.build import Reporter, build
    from exporter.cache import ArtifactCache
    from exporter.config import BuildConfig
    from runtime_harness.cli import main as harness_main

    bundle = tmp_path / "bundle"
    build(BuildConfig(model=str(tiny_checkpoint), backend="coreml", out=bundle, lora=LORA, method="mebp",
                      optimizer="adamw", vocab_chunk_rows=ROWS), Reporter(progress=False), ArtifactCache.disabled())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["weights"]["layers_in_graphs"] and not (bundle / "weights" / "layer_00.safetensors").exists()
    assert {g["file"] for g in manifest["graphs"].values()} == {
        "graphs/embed.mlpackage", "graphs/head.mlpackage", "graphs/optimizer.mlpackage",
        "graphs/layer_00.mlpackage", "graphs/layer_01.mlpackage"}
    for runtime in ([] if sys.platform == "darwin" else ["--runtime", "coreml"]), ["--runtime", "mil"]:
        report = tmp_path / "r.json"
        assert harness_main(["verify", str(bundle), "--report", str(report), *runtime]) == 0
        out = capsys.readouterr().out
        result = json.loads(report.read_text())
        assert result["ok"] and len(result["tensors"]) == 28 and result["worst"]["max_rel_err"] <= 1e-4
        assert ("interpreter" in result["runtime"]) == (runtime[-1:] == ["mil"] or sys.platform != "darwin")
        assert "runtime: " in out and "PASS (structure)" in out and "-> PASS" in out
        assert "layer_01.mlpackage: functions layer_forward, layer_backward match the manifest, weights" in out
    # an altered package is caught by its checksum
    weights = bundle / "graphs/layer_01.mlpackage" / WEIGHTS_BIN
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    assert harness_main(["verify", str(bundle)]) == 2


@off_macos
def test_framework_needs_macos_and_the_default_runs_the_interpreter(lowered):
    folder, _, entry = lowered["mesp", "layer_00.layer_forward"]
    with pytest.raises(RuntimeUnavailable, match="--runtime mil"):
        FRAMEWORK.load(folder, entry)
    assert BACKEND.interpreter and "interpreter" in BACKEND.runtime and MIL_RUNTIME.interpreter


def test_interpreter_knows_every_op_the_exporter_emits(lowered):
    """The op types of every converted function (coremltools' milproto loader: all functions of each
    multifunction package) are in the op table; no epsilon survives the conversion (`exact_epsilons`)."""
    seen: set[str] = set()
    for folder, _, entry in lowered.values():
        program = load_program(folder / entry["file"])
        assert set(program.functions) == set(describe_package(folder / entry["file"])["functions"])
        for fn in program.functions.values():
            seen |= {op.op_type for op in fn.operations}
            eps = [float(op.epsilon.val) for op in fn.operations if op.op_type in coreml_exact.EPSILON_OPS]
            assert all(e == 0 for e in eps), (entry["method"], eps)
            if entry["method"].startswith("layer"):
                assert len(eps) >= 2  # RMSNorm's rsqrt, with epsilon 0
        assert coreml_exact.problems(program) == []
    assert "inverse" not in seen  # RoPE's 1 / theta^x is a division now
    assert seen - {"const"} <= set(OPS), seen - set(OPS)
    assert len(seen) >= 40


def test_loader_reads_blob_constants(lowered):
    """coremltools' private milproto loader + BlobReader: a layer package's weight constants are the weights."""
    folder, g, entry = lowered["mesp", "layer_00.layer_forward"]
    program = load_program(folder / entry["file"])
    consts = [np.asarray(op.outputs[0].val) for fn in program.functions.values() for op in fn.operations
              if op.op_type == "const" and np.asarray(op.outputs[0].val).size > 16]
    for name, w in g.constants.items():
        assert any(c.shape == tuple(w.shape) and np.array_equal(c, w.numpy()) for c in consts), name


def test_layer_packages_from_the_template_equal_converted_ones(lowered, tmp_path):
    """`lower_baked`: converted once (two sentinel templates), then per layer the weight bytes swapped. The
    package equals the directly converted one function by function (op graph and constants), and a second
    layer's package computes that layer as eager does."""
    import functools

    folder, g, entry = lowered["mesp", "layer_00.layer_forward"]
    backend = CoreMLBackend()
    shapes = step_shapes()
    make = functools.partial(gd.layer_graphs, shapes, shapes.spec.layer_types[0])
    got = backend.lower_baked("layer_00", make, g.constants, tmp_path)
    assert backend._templates[make] is not None  # the template was proven, not the fallback
    assert [x.id for x in got] == ["layer_00.layer_forward", "layer_00.layer_backward"]
    assert [x.to_dict() for x in got] == [{k: v for k, v in lowered["mesp", x.id][2].items() if k != "constant_bytes"}
                                          for x in got]
    fast, direct = load_program(tmp_path / entry["file"]), load_program(folder / entry["file"])
    assert list(fast.functions) == list(direct.functions)
    for name in direct.functions:
        a, b = fast.functions[name].operations, direct.functions[name].operations
        assert [(o.op_type, o.name, sorted(o.inputs)) for o in a] == [(o.op_type, o.name, sorted(o.inputs)) for o in b]
        for x, y in zip(a, b):
            if x.op_type == "const":
                np.testing.assert_array_equal(np.asarray(x.outputs[0].val), np.asarray(y.outputs[0].val), err_msg=x.name)
    assert (tmp_path / entry["file"] / WEIGHTS_BIN).read_bytes() == (folder / entry["file"] / WEIGHTS_BIN).read_bytes()
    # another layer: new weights in the same regions, and its function computes that layer
    torch.manual_seed(5)
    other = {k: v.float() for k, v in random_layer_weights(SPEC).items()}
    second = backend.lower_baked("layer_01", make, other, tmp_path)
    assert second[0].file == "graphs/layer_01.mlpackage"
    lora = {k: v.float() for k, v in random_lora(SPEC, LORA).items()}
    x = torch.randn(LORA.batch, LORA.seq_len, SPEC.hidden_size)
    inputs = [x, *[lora[n] for n in step_shapes().lora_names()]]
    ref = make(other)[0]
    got, want = run_both((tmp_path, ref, second[0].to_dict()), inputs, MIL_RUNTIME)
    assert_close(got, want, ["y"], RTOL["mil"])


# ------------------------------------------------------------------------------- predictions (macOS)

def tokens(labels: bool = False) -> torch.Tensor:
    ids = torch.randint(0, SPEC.vocab_size, (LORA.batch, LORA.seq_len))
    ids[0, 0], ids[0, -1] = 0, SPEC.vocab_size - 1
    if labels:
        ids[0, 3] = ids[0, 9] = head_math.IGNORE_INDEX
    return ids


def test_embed_chunk_predicts_as_eager(lowered, runtime):
    name, backend = runtime
    C, H = step_shapes().chunk_rows, SPEC.hidden_size
    item = lowered["common", "embed.embed_chunk"]
    for offset in (0, C, 2 * C):
        inputs = [tokens(), torch.randn(C, H), torch.tensor([offset]), torch.randn(LORA.batch, LORA.seq_len, H)]
        got, want = run_both(item, inputs, backend)
        assert_close(got, want, ["acc_out"], RTOL[name])


@pytest.mark.parametrize("method", gd.METHODS)
def test_layer_predicts_as_eager(lowered, method, runtime):
    name, backend = runtime
    lora = {k: v.float() for k, v in random_lora(SPEC, LORA).items()}
    adapters = [lora[n] for n in step_shapes().lora_names()]
    hidden = (LORA.batch, LORA.seq_len, SPEC.hidden_size)
    x, dy = torch.randn(hidden), torch.randn(hidden)
    got, want = run_both(lowered[method, "layer_00.layer_forward"], [x, *adapters], backend)
    assert_close(got, want, ["y"], RTOL[name])
    bwd = lowered[method, "layer_00.layer_backward"]
    got, want = run_both(bwd, [x, dy, *adapters], backend)
    assert all(np.abs(w).max() > 0 for w in want)
    assert_close(got, want, [t.name for t in bwd[1].outputs], RTOL[name])


def test_head_predicts_as_eager(lowered, runtime):
    name, backend = runtime
    s = step_shapes()
    C, H, V = s.chunk_rows, SPEC.hidden_size, SPEC.vocab_size
    E = torch.randn(C * s.num_chunks, H)
    E[V:] = 0
    x, w = torch.randn(LORA.batch, LORA.seq_len, H), 1 + 0.1 * torch.randn(H)
    labels = tokens(labels=True)
    state = [torch.full(s.tokens, float("-inf")), torch.zeros(s.tokens), torch.zeros(s.hidden), torch.zeros(s.hidden)]
    item = lowered["common", "head.head_chunk"]
    for c in range(s.num_chunks):
        got, want = run_both(item, [x, w, labels, E[c * C:(c + 1) * C], torch.tensor([c * C]), *state], backend)
        assert_close(got, want, [t.name for t in item[1].outputs], RTOL[name])
        state = [torch.from_numpy(t) for t in want]
    fin = lowered["common", "head.head_finish"]
    got, want = run_both(fin, [x, w, labels, *state], backend)
    assert_close(got, want, ["loss", "dx"], RTOL[name])


@pytest.mark.parametrize("optimizer", gd.OPTIMIZERS)
def test_optimizer_predicts_as_eager(lowered, optimizer, runtime):
    name, backend = runtime
    item = lowered[optimizer, "optimizer.optimizer"]
    shapes = list(LORA.layer_lora_shapes(SPEC).values())
    params, grads = [torch.randn(sh) for sh in shapes], [torch.randn(sh) for sh in shapes]
    head = [torch.tensor([1e-2])] + ([torch.tensor([3.0])] if optimizer == "adamw" else [])
    moments = [torch.randn(sh) * 0.1 for sh in shapes] + [torch.rand(sh) * 0.01 for sh in shapes]
    got, want = run_both(item, head + params + grads + (moments if optimizer == "adamw" else []), backend)
    assert_close(got, want, [t.name for t in item[1].outputs], RTOL[name])
