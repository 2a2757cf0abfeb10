"""Integrity end to end: a tampered bundle (any file, the manifest and its checksum included) is one line
and exit 2 in every command; cached artifacts are checked before reuse; the checkpoint is identified by
its content; `verify` compares with the checkpoint the bundle was built from, not with the bundle's
own weight files. Bundles use the test-only eager backend (tests/eager_backend.py)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import exporter.build as build_mod
import runtime_harness.runner as runner_mod
from eager_backend import EagerBackend
from exporter import integrity
from exporter.cache import ArtifactCache
from exporter.cli import main as exporter_main
from exporter.config import BuildConfig
from graphs.config import LoraConfig
from runtime_harness.cli import main as harness_main
from runtime_harness.verify import verify

TINY_LORA = LoraConfig(rank=4, seq_len=16)


def _build(checkpoint: Path, out: Path, cache: ArtifactCache | None = None, **kw) -> dict:
    config = BuildConfig(model=str(checkpoint), backend="executorch", out=out, lora=TINY_LORA,
                         vocab_chunk_rows=128, **kw)
    return build_mod.build(config, build_mod.Reporter(progress=False), cache or ArtifactCache.disabled())


@pytest.fixture(scope="module")
def eager_patch():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_mod, "get_backend", lambda name: EagerBackend())
        mp.setattr(runner_mod, "get_backend", lambda name: EagerBackend())
        yield


@pytest.fixture(scope="module")
def bundle(eager_patch, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "bundle"
    _build(tiny_checkpoint, out)
    return out


def _flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(b: Path) -> None:
    """An edited schedule, as a user or a broken tool would leave it (valid JSON, checksum not updated)."""
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["schedules"]["train_step"][-1]["free"].append("dy")
    (b / "manifest.json").write_text(json.dumps(manifest, indent=1))


TAMPER = {
    "manifest": (_edit_manifest, "manifest.json was altered"),
    "manifest checksum": (lambda b: (b / "manifest.sha256").write_text("0" * 64 + "  manifest.json\n"),
                          "manifest.json was altered"),
    "manifest checksum missing": (lambda b: (b / "manifest.sha256").unlink(), "manifest.sha256 is missing"),
    "layer weights": (lambda b: _flip_byte(b / "weights" / "layer_01.safetensors"),
                      "weights/layer_01.safetensors was altered"),
    "graph": (lambda b: _flip_byte(b / "graphs" / "layer.attn_backward.pt2", 100),
              "graphs/layer.attn_backward.pt2 was altered"),
    "adapter": (lambda b: _flip_byte(b / "adapter" / "adapter_model.safetensors"),
                "adapter/adapter_model.safetensors was altered"),
    "missing file": (lambda b: (b / "weights" / "final_norm.safetensors").unlink(),
                     "weights/final_norm.safetensors is missing"),
}


def _command(name: str, b: Path, tmp: Path) -> tuple:
    np.save(tmp / "ids.npy", np.zeros((1, 16), dtype=np.int64))
    (tmp / "text.txt").write_text("hello world, " * 10)
    return {
        "verify": (harness_main, ["verify", str(b), "--report", str(tmp / "r" / "report.json")]),
        "grads": (harness_main, ["grads", str(b), "--input-ids", str(tmp / "ids.npy"), "--out", str(tmp / "g.st")]),
        "train": (harness_main, ["train", str(b), "--data", str(tmp / "text.txt"), "--steps", "1",
                                 "--out", str(tmp / "run")]),
        "memory": (harness_main, ["memory", str(b), "--out", str(tmp / "mem")]),
        "profile": (harness_main, ["profile", str(b), "--out", str(tmp / "prof")]),
        "inspect": (exporter_main, ["inspect", str(b)]),
    }[name]


@pytest.mark.parametrize("tamper", list(TAMPER))
@pytest.mark.parametrize("command", ["verify", "grads", "train", "memory", "profile", "inspect"])
def test_tampered_bundle_is_one_line_exit_2_in_every_command(bundle, tmp_path, capsys, command, tamper):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    mutate, message = TAMPER[tamper]
    mutate(b)
    main, argv = _command(command, b, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0], captured.err
    assert "PASS" not in captured.out


def test_untampered_bundle_checks_and_sha256sum_agrees(bundle):
    """The sidecar is `sha256sum` format, checkable by app teams with standard tools."""
    import subprocess

    line = (bundle / "manifest.sha256").read_text()
    assert line.endswith("  manifest.json\n")
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "manifest.sha256"], cwd=bundle, capture_output=True).returncode == 0
    manifest = runner_mod.load_manifest(bundle)
    assert "manifest.json" not in manifest["files"] and "manifest.sha256" not in manifest["files"]
    assert exporter_main(["inspect", str(bundle)]) == 0


# ------------------------------------------------------------------------------------------- the cache

def test_corrupted_cache_entries_are_rebuilt(eager_patch, tiny_checkpoint, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    first = _build(tiny_checkpoint, tmp_path / "a", ArtifactCache(cache_root))
    cached_graph = next(cache_root.rglob("files/graphs/layer.attn_backward.pt2"))
    cached_weight = next(p for p in cache_root.rglob("file")
                         if (p.parent / "sha256").read_text() == first["files"]["weights/layer_01.safetensors"]["sha256"])
    _flip_byte(cached_graph, 100)
    _flip_byte(cached_weight)
    lowered, written = [], []
    lower, save = EagerBackend.lower, build_mod.save_file
    monkeypatch.setattr(EagerBackend, "lower", lambda self, *a: lowered.append(a[0]) or lower(self, *a))
    monkeypatch.setattr(build_mod, "save_file", lambda t, path, *a, **k: written.append(Path(path).name) or save(t, path, *a, **k))
    cache = ArtifactCache(cache_root)
    second = _build(tiny_checkpoint, tmp_path / "b", cache)
    assert lowered == ["layer"]  # the corrupted program only
    assert "layer_01.safetensors" in written and "layer_00.safetensors" not in written
    assert len(cache.discarded) == 2
    # the bundle is right: the same weights (eager .pt2 archives are not byte-reproducible), and it verifies
    assert {k: v for k, v in second["files"].items() if not k.startswith("graphs/")} == \
        {k: v for k, v in first["files"].items() if not k.startswith("graphs/")}
    assert verify(tmp_path / "b", seed=0)["ok"]
    lowered.clear()
    _build(tiny_checkpoint, tmp_path / "c", ArtifactCache(cache_root))  # the cache was repaired
    assert lowered == []


# ---------------------------------------------------------------------------------- the checkpoint

def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_checkpoint_keep_size_and_mtime(folder: Path) -> None:
    """Change one value in the checkpoint; size and modification time stay as they were."""
    path = folder / "model.safetensors"
    st = path.stat()
    tensors = load_file(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_checkpoint_is_identified_by_its_content(eager_patch, tiny_checkpoint, tmp_path):
    from exporter.weights import open_weights
    from graphs.config import ModelSpec

    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    cache = ArtifactCache(tmp_path / "cache")
    first = _build(ckpt, tmp_path / "a", cache)
    spec = ModelSpec(**first["model"]["architecture"])
    assert first["weights"]["sha256"] == open_weights(str(ckpt), spec).content_sha256()
    _edit_checkpoint_keep_size_and_mtime(ckpt)
    second = _build(ckpt, tmp_path / "b", cache)
    assert second["weights"]["sha256"] != first["weights"]["sha256"]
    assert second["files"]["weights/layer_01.safetensors"] != first["files"]["weights/layer_01.safetensors"]
    assert second["files"]["weights/layer_00.safetensors"] == first["files"]["weights/layer_00.safetensors"]
    assert verify(tmp_path / "b", seed=0)["ok"]


def test_verify_refuses_a_checkpoint_changed_since_the_build(eager_patch, tiny_checkpoint, tmp_path, capsys):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    _build(ckpt, tmp_path / "bundle")
    _edit_checkpoint_keep_size_and_mtime(ckpt)
    assert harness_main(["verify", str(tmp_path / "bundle"), "--report", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has changed since the bundle was built" in err[0]


def test_manifest_carries_the_checkpoints_own_config(eager_patch, tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["max_position_embeddings"] = 1234
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = _build(ckpt, tmp_path / "bundle")
    assert manifest["model"]["hf_config"] == config


def test_verify_compares_with_the_checkpoint_not_the_bundle_weights(bundle, tmp_path, capsys):
    """A bundle whose weights differ from its checkpoint fails, even re-signed so that every checksum passes."""
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    path = b / "weights" / "layer_01.safetensors"
    tensors = load_file(str(path))
    tensors["self_attn.v_proj.weight"] = tensors["self_attn.v_proj.weight"] * 1.1
    save_file(tensors, str(path))
    manifest = json.loads((b / "manifest.json").read_text())
    integrity.resign(b, manifest)
    runner_mod.load_manifest(b)  # every checksum passes
    report_path = tmp_path / "report.json"
    assert harness_main(["verify", str(b), "--report", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert not report["ok"]
    bad = [r["name"] for r in report["tensors"] if not r["ok"]]
    assert bad and all(".layers.0." in n or ".layers.1." in n for n in bad)
    assert not report["loss_ok"]
    assert "FAIL" in capsys.readouterr().out
