"""The bundle pipeline with the test-only eager backend: build, manifest, replay, verify, safety, cache.

Lowering to the real runtimes is covered in tests/test_backend_*.py and tests/test_backends.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import exporter.build as build_mod
import runtime_harness.runner as runner_mod
from eager_backend import EagerBackend
from exporter.cache import ArtifactCache
from exporter.config import BuildConfig
from exporter.manifest import ManifestError, validate
from graphs.config import LoraConfig
from runtime_harness.runner import BundleError, BundleRunner
from runtime_harness.runner import check_bundle_files as check_files
from runtime_harness.verify import verify

TINY_LORA = LoraConfig(rank=4, seq_len=16)


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setattr(build_mod, "get_backend", lambda name: EagerBackend())
    monkeypatch.setattr(runner_mod, "get_backend", lambda name: EagerBackend())


def _build(checkpoint: Path, out: Path, cache: ArtifactCache | None = None, **kw) -> dict:
    config = BuildConfig(model=str(checkpoint), backend="executorch", out=out, lora=kw.pop("lora", TINY_LORA),
                         vocab_chunk_rows=128, **kw)
    return build_mod.build(config, build_mod.Reporter(progress=False), cache or ArtifactCache.disabled())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["mesp", "mebp"])
def test_build_then_verify_matches_transformers_peft(eager, tiny_checkpoint, tmp_path, method, optimizer):
    manifest = _build(tiny_checkpoint, tmp_path / "bundle", method=method, optimizer=optimizer)
    validate(json.loads((tmp_path / "bundle" / "manifest.json").read_text()))
    assert manifest["method"] == method and manifest["optimizer"]["name"] == optimizer
    report = verify(tmp_path / "bundle", seed=3)
    assert report["ok"], report["worst"]
    assert report["worst"]["cosine"] >= 0.99999 and report["worst"]["max_rel_err"] <= 1e-4
    assert len(report["tensors"]) == 2 * 14


def test_lora_target_subset_and_rank(eager, tiny_checkpoint, tmp_path):
    lora = LoraConfig(rank=2, alpha=8, targets=("v", "down"), seq_len=16)
    _build(tiny_checkpoint, tmp_path / "bundle", lora=lora)
    report = verify(tmp_path / "bundle", seed=1)
    assert report["ok"] and len(report["tensors"]) == 2 * 4


def test_sgd_update_is_applied_per_layer_right_after_its_gradients(eager, tiny_checkpoint, tmp_path):
    _build(tiny_checkpoint, tmp_path / "bundle")
    runner = BundleRunner(tmp_path / "bundle")
    schedule = runner.manifest["schedules"]["train_step"]
    graphs = [e["graph"] for e in schedule if e["op"] == "call"]
    backward = [k for k, g in enumerate(graphs) if g.endswith(("layer_backward", "attn_backward"))]  # a layer's last
    assert all(graphs[k + 1] == "optimizer.optimizer" for k in backward)
    from runtime_harness.verify import bundle_gradients, nonzero_adapter, seeded_batch

    adapter = nonzero_adapter(runner.manifest, 0)
    ids, labels = seeded_batch(runner.manifest, 0)
    _, grads = bundle_gradients(runner, adapter, ids, labels)
    store = runner.initial_state(adapter)
    runner.step(store, ids, labels, lr=0.5)
    for t in runner.manifest["state"]:
        name = t["init"]["adapter"]
        np.testing.assert_allclose(store[t["name"]], adapter[name] - 0.5 * grads[name], rtol=1e-5, atol=1e-6)


def test_manifest_validation_catches_broken_schedules(eager, tiny_checkpoint, tmp_path):
    manifest = _build(tiny_checkpoint, tmp_path / "bundle")
    manifest.pop("bundle_dir")
    broken = json.loads(json.dumps(manifest))
    first_layer = next(e for e in broken["schedules"]["train_step"] if e.get("layer") == 0 and "x" in e["inputs"])
    first_layer["inputs"]["x"] = "x.7"
    with pytest.raises(ManifestError, match="x.7"):
        validate(broken)
    broken = json.loads(json.dumps(manifest))  # a slice of a tensor that does not exist yet
    block = next(e for e in broken["schedules"]["train_step"] if e.get("graph") == "layer.mlp_block_backward")
    target = next(t for t in block["outputs"].values() if isinstance(t, dict))
    target["tensor"] = "grad.9.nothing"
    with pytest.raises(ManifestError, match="grad.9.nothing"):
        validate(broken)
    broken = json.loads(json.dumps(manifest))
    broken["backend"] = "tflite"
    with pytest.raises(ManifestError, match="backend"):
        validate(broken)


def test_altered_or_missing_file_is_reported(eager, tiny_checkpoint, tmp_path):
    _build(tiny_checkpoint, tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    check_files(bundle, manifest)
    layer = bundle / "weights" / "layer_01.safetensors"
    data = bytearray(layer.read_bytes())
    data[-3] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="layer_01.safetensors was altered"):
        check_files(bundle, manifest)
    layer.unlink()
    with pytest.raises(BundleError, match="layer_01.safetensors is missing"):
        check_files(bundle, manifest)


def test_failed_build_leaves_nothing_and_keeps_the_old_bundle(eager, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    _build(tiny_checkpoint, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def explode(*a, **k):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(EagerBackend, "lower", explode)
    with pytest.raises(RuntimeError):
        _build(tiny_checkpoint, out, seed=5)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left


def test_rebuild_with_same_inputs_reuses_the_cache(eager, tiny_checkpoint, tmp_path, monkeypatch):
    cache = ArtifactCache(tmp_path / "cache")
    t0 = time.perf_counter()
    first = _build(tiny_checkpoint, tmp_path / "a", cache=cache)
    cold = time.perf_counter() - t0
    calls = []
    original = EagerBackend.lower
    monkeypatch.setattr(EagerBackend, "lower", lambda self, *a: calls.append(a[0]) or original(self, *a))
    t0 = time.perf_counter()
    second = _build(tiny_checkpoint, tmp_path / "b", cache=cache)
    warm = time.perf_counter() - t0
    assert calls == []  # nothing re-lowered
    assert first["files"] == second["files"]
    assert warm < cold
    _build(tiny_checkpoint, tmp_path / "c", cache=cache, method="mebp")
    assert calls == ["layer"]  # only the program whose math changed


def test_adapter_is_peft_format_and_round_trips(eager, tiny_checkpoint, tmp_path):
    import peft
    import transformers

    _build(tiny_checkpoint, tmp_path / "bundle")
    base = transformers.Qwen2ForCausalLM.from_pretrained(str(tiny_checkpoint))
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "bundle" / "adapter"))
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora_names) == 2 * 2 * 7
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in b)  # PEFT default init: B = 0


def test_bad_batch_and_adapter_are_one_line_errors(eager, tiny_checkpoint, tmp_path):
    from runtime_harness.verify import check_adapter, check_batch

    manifest = _build(tiny_checkpoint, tmp_path / "bundle")
    ids = np.zeros((1, 16), dtype=np.int64)
    with pytest.raises(BundleError, match="shape"):
        check_batch(manifest, ids[:, :8], ids[:, :8])
    with pytest.raises(BundleError, match=r"token ids must be in \[0, 320\)"):
        check_batch(manifest, ids + 320, ids)
    with pytest.raises(BundleError, match="rank 4"):
        check_adapter(manifest, {t["init"]["adapter"]: np.zeros((3, 3)) for t in manifest["state"]})
