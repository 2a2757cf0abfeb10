"""Bad input, one case per row: (what is given) -> (exit code, a fragment of the one error line), and nothing
of the user's lost or left half-written. Every new flag gets its rows here.

A case is a function of the context (a tiny checkpoint, a tiny ONNX Runtime bundle, a scratch folder) that
prepares the inputs and returns the argv of `python -m exporter` or `python -m runtime_harness`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.build import Reporter, build
from exporter.integrity import resign as resign_bundle, write_manifest
from exporter.cache import ArtifactCache
from exporter.cli import main as exporter_main
from exporter.config import BuildConfig
from graphs.config import LoraConfig
from runtime_harness.cli import main as harness_main

BUNDLE_SETTINGS = dict(lora=LoraConfig(rank=4, seq_len=16), vocab_chunk_rows=128)  # as tests/test_harness.py


@pytest.fixture(scope="session")
def ort_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "tiny-ort"
    cache = ArtifactCache(tmp_path_factory.getbasetemp() / "artifact-cache")
    build(BuildConfig(model=str(tiny_checkpoint), backend="ort", out=out, **BUNDLE_SETTINGS), Reporter(progress=False),
          cache)
    return out


@dataclass
class Ctx:
    tmp: Path
    ckpt: Path
    bundle: Path

    def copy_ckpt(self) -> Path:
        dst = self.tmp / "ckpt"
        shutil.copytree(self.ckpt, dst)
        return dst

    def copy_bundle(self) -> Path:
        dst = self.tmp / "bundle"
        shutil.copytree(self.bundle, dst)
        return dst

    def text(self) -> Path:
        p = self.tmp / "text.txt"
        p.write_text("the quick brown fox jumps over the lazy dog. " * 4)
        return p

    def adapter(self, tensors=None, config=None) -> Path:
        """A copy of the bundle's adapter, with its tensors / config changed by the callers."""
        folder = self.tmp / "adapter"
        shutil.copytree(self.bundle / "adapter", folder)
        if tensors is not None:
            save_file(tensors(load_file(str(folder / "adapter_model.safetensors"))),
                      str(folder / "adapter_model.safetensors"))
        if config is not None:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps(config(cfg)))
        return folder

    def ids(self) -> Path:
        np.save(self.tmp / "ids.npy", np.zeros((1, 16), dtype=np.int64))
        return self.tmp / "ids.npy"


def _build(ctx: Ctx, *extra: str, model: str | None = None) -> tuple:
    return exporter_main, ["build", "--model", model or str(ctx.ckpt), "--backend", "ort", "--seq-len", "16",
                           "--lora-rank", "4", "--vocab-chunk-rows", "128", *extra]


def _random_build(*extra: str) -> Callable:
    return lambda ctx: (exporter_main, ["build", "--model", "qwen2.5-0.5b", "--backend", "ort", "--weights", "random",
                                        "--out", str(ctx.tmp / "o"), *extra])


def _ckpt(mutate: Callable[[Path], None]) -> Callable:
    def case(ctx: Ctx):
        ckpt = ctx.copy_ckpt()
        mutate(ckpt)
        return _build(ctx, "--out", str(ctx.tmp / "o"), model=str(ckpt))
    return case


def _config(edit: Callable[[dict], object]) -> Callable:
    def mutate(ckpt: Path):
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps(edit(cfg)))
    return _ckpt(mutate)


def _set(key, value) -> Callable:
    return _config(lambda c: {**c, key: value})


def _weights_file(ckpt: Path) -> Path:
    return ckpt / "model.safetensors"


def _truncate(ckpt: Path) -> None:
    data = _weights_file(ckpt).read_bytes()
    _weights_file(ckpt).write_bytes(data[:len(data) // 2])


def _random_bytes(ckpt: Path) -> None:
    _weights_file(ckpt).write_bytes(os.urandom(4096))


def _wrong_shape(ckpt: Path) -> None:
    t = load_file(str(_weights_file(ckpt)))
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(t, str(_weights_file(ckpt)), metadata={"format": "pt"})


def _missing_shard(ckpt: Path) -> None:
    t = load_file(str(_weights_file(ckpt)))
    names = sorted(t)
    save_file({n: t[n] for n in names[:len(names) // 2]}, str(ckpt / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if k < len(names) // 2 else
                                               "model-00002-of-00002.safetensors") for k, n in enumerate(names)}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _weights_file(ckpt).unlink()


def _out_with(files: Callable[[Path, Ctx], None]) -> Callable:
    """--out names a folder holding the user's files (checked intact afterwards by _out_intact)."""
    def case(ctx: Ctx):
        out = ctx.tmp / "mine"
        out.mkdir()
        files(out, ctx)
        return _build(ctx, "--out", str(out))
    return case


def _out_intact(ctx: Ctx) -> None:
    assert (ctx.tmp / "mine" / "notes.txt").read_text() == "mine"


def _manifest_not_json(out: Path, ctx: Ctx) -> None:
    (out / "notes.txt").write_text("mine")
    (out / "manifest.json").write_text("my shopping list")


def _manifest_not_a_bundle(out: Path, ctx: Ctx) -> None:
    (out / "notes.txt").write_text("mine")
    (out / "manifest.json").write_text(json.dumps({"name": "my project", "version": 3}))


def _manifest_files_missing(out: Path, ctx: Ctx) -> None:
    (out / "notes.txt").write_text("mine")
    shutil.copy(ctx.bundle / "manifest.json", out / "manifest.json")  # a real manifest, its files not here


def _harness(*argv: str) -> Callable:
    """argv with {bundle}, {tmp}, {text}, {ids} filled in."""
    def case(ctx: Ctx):
        fill = {"bundle": str(ctx.bundle), "tmp": str(ctx.tmp), "text": str(ctx.text()), "ids": str(ctx.ids())}
        return harness_main, [a.format(**fill) for a in argv]
    return case


def _with_adapter(command: str, tensors=None, config=None, raw: Callable[[Path], None] | None = None) -> Callable:
    def case(ctx: Ctx):
        folder = ctx.adapter(tensors, config)
        if raw is not None:
            raw(folder / "adapter_model.safetensors")
        tail = {"verify": [], "grads": ["--input-ids", str(ctx.ids()), "--out", str(ctx.tmp / "g.safetensors")],
                "train": ["--data", str(ctx.text()), "--steps", "1", "--out", str(ctx.tmp / "run")]}[command]
        return harness_main, [command, str(ctx.bundle), "--adapter", str(folder), *tail]
    return case


def _damaged_bundle(command: str, mutate: Callable[[Path], None], resign: bool = False) -> Callable:
    def case(ctx: Ctx):
        bundle = ctx.copy_bundle()
        mutate(bundle)
        if resign:  # the manifest re-signed, so that only the file's content can give it away
            resign_bundle(bundle, json.loads((bundle / "manifest.json").read_text()))
        tail = {"train": ["--data", str(ctx.text()), "--steps", "1", "--out", str(ctx.tmp / "run")],
                "verify": [], "inspect": []}[command]
        main = exporter_main if command == "inspect" else harness_main
        return main, [command, str(bundle), *tail]
    return case


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(bundle: Path):
        m = json.loads((bundle / "manifest.json").read_text())
        edit(m)
        write_manifest(bundle, m)  # re-signed: what is checked is the content, not the checksum
    return mutate


def _scale_first(t: dict, value: float) -> dict:
    name = sorted(t)[0]
    t[name] = t[name].clone()
    t[name].view(-1)[0] = value
    return t


def _run_out(kind: str) -> Callable:
    """train --out at a place it must not write."""
    def case(ctx: Ctx):
        out = {"bundle": ctx.bundle, "inside": ctx.bundle / "runs", "previous": ctx.tmp / "previous"}[kind]
        if kind == "previous":
            out.mkdir()
            (out / "loss.csv").write_text("step,loss\n1,5.0\n")
        return harness_main, ["train", str(ctx.bundle), "--data", str(ctx.text()), "--steps", "1", "--out", str(out)]
    return case


def _previous_intact(ctx: Ctx) -> None:
    assert (ctx.tmp / "previous" / "loss.csv").read_text() == "step,loss\n1,5.0\n"


def _no(*names: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        for n in names:
            assert not (ctx.tmp / n).exists(), n
    return check


CASES = [
    # -- build: output folders (never lose a user's file)
    ("out-manifest-not-json", _out_with(_manifest_not_json), 2, "is not a bundle; refusing to replace it", _out_intact),
    ("out-manifest-not-a-bundle", _out_with(_manifest_not_a_bundle), 2, "is not a bundle; refusing", _out_intact),
    ("out-manifest-files-missing", _out_with(_manifest_files_missing), 2, "missing or has another size", _out_intact),
    ("out-under-proc", lambda ctx: _build(ctx, "--out", "/proc/ondevice-lora-bundle"), 2, "cannot write to", None),
    ("out-is-cwd", lambda ctx: _build(ctx, "--out", "."), 2, "is the current folder", None),
    ("out-is-a-file", lambda ctx: ((ctx.tmp / "f").write_text("x"), _build(ctx, "--out", str(ctx.tmp / "f")))[1], 2,
     "exists and is not a folder", None),
    # -- build: checkpoints
    ("ckpt-truncated", _ckpt(_truncate), 2, "not a valid safetensors file", _no("o")),
    ("ckpt-random-bytes", _ckpt(_random_bytes), 2, "not a valid safetensors file", _no("o")),
    ("ckpt-wrong-shape", _ckpt(_wrong_shape), 2, "model.layers.1.mlp.up_proj.weight has shape (95, 64)", _no("o")),
    ("ckpt-missing-shard", _ckpt(_missing_shard), 2, "lacks the shard model-00002-of-00002.safetensors", _no("o")),
    ("config-not-an-object", _config(lambda c: [c]), 2, "config.json is not a JSON object", _no("o")),
    ("config-zero-heads", _set("num_attention_heads", 0), 2, "num_attention_heads must be a positive integer", None),
    ("config-negative-hidden", _set("hidden_size", -64), 2, "hidden_size must be a positive integer", None),
    ("config-zero-layers", _set("num_hidden_layers", 0), 2, "num_hidden_layers must be a positive integer", None),
    ("config-zero-vocab", _set("vocab_size", 0), 2, "vocab_size must be a positive integer", None),
    ("config-string-size", _set("intermediate_size", "big"), 2, "config.json", None),
    ("config-zero-eps", _set("rms_norm_eps", 0), 2, "rms_norm_eps must be a positive finite number", None),
    ("seq-len-beyond-positions", _config(lambda c: {**c, "max_position_embeddings": 8}), 2,
     "--seq-len 16 is longer than the checkpoint's max_position_embeddings (8)", _no("o")),
    # -- build: settings that cannot train or cannot fit on a phone
    ("alpha-nan", _random_build("--lora-alpha", "nan"), 2, "--lora-alpha: nan is not a positive finite number", None),
    ("alpha-inf", _random_build("--lora-alpha", "inf"), 2, "is not a positive finite number", None),
    ("alpha-zero", _random_build("--lora-alpha", "0"), 2, "is not a positive finite number", None),
    ("alpha-negative", _random_build("--lora-alpha", "-16"), 2, "is not a positive finite number", None),
    ("rank-zero", _random_build("--lora-rank", "0"), 2, "--lora-rank: 0 is not a positive integer", None),
    ("rank-beyond-dimension", _random_build("--lora-rank", "200"), 2, "larger than the smallest adapted dimension", None),
    ("seq-len-one", _random_build("--seq-len", "1"), 2, "sequence length must be at least 2", None),
    ("seed-negative", _random_build("--seed", "-1"), 2, "--seed: -1 is not a non-negative integer", None),
    ("vocab-chunk-rows-zero", _random_build("--vocab-chunk-rows", "0"), 2, "--vocab-chunk-rows: 0 is not a positive", None),
    ("mlp-blocks-zero", _random_build("--mlp-blocks", "0"), 2, "--mlp-blocks: 0 is not a positive integer", None),
    ("mlp-blocks-beyond-channels", _random_build("--mlp-blocks", "5000"), 2, "larger than the MLP's 4864 channels", None),
    ("targets-empty", _random_build("--lora-targets", ","), 2, "at least one LoRA target is needed", None),
    ("quant-unknown", _random_build("--quant", "int3"), 2, "--quant: invalid choice: 'int3'", None),
    ("quant-group-not-dividing", _random_build("--quant", "int4", "--quant-group-size", "96"), 2,
     "--quant-group-size 96 does not divide self_attn.q_proj.weight's 896 input columns", _no("o")),
    ("quant-group-odd-int4", _random_build("--quant", "int4", "--quant-group-size", "7"), 2,
     "--quant-group-size 7 is odd", None),
    ("quant-group-negative", _random_build("--quant", "int8", "--quant-group-size", "-1"), 2,
     "--quant-group-size: -1 is not a non-negative integer", None),
    ("quant-group-without-quant", _random_build("--quant-group-size", "64"), 2,
     "--quant-group-size needs --quant int4 or int8", None),
    ("delegate-unknown", _random_build("--delegate", "qnn"), 2, "--delegate: invalid choice: 'qnn'", None),
    ("delegate-with-ort", _random_build("--delegate", "xnnpack"), 2,
     "--delegate is for executorch bundles only; the ort backend has no delegates", _no("o")),
    ("delegate-none-with-ort", _random_build("--delegate", "none"), 2,
     "--delegate is for executorch bundles only; the ort backend has no delegates", _no("o")),
    # (mesp at the longest sequence fits: its scores are one query block at a time and the state is paged)
    ("step-beyond-a-phone-mebp", _random_build("--seq-len", "16384", "--method", "mebp"), 2,
     "more than a phone has (8 GiB); lower --seq-len or use --method mesp", _no("o")),
    # -- inspect
    ("inspect-incomplete-manifest", _damaged_bundle("inspect", _manifest_edit(lambda m: m.pop("schedules"))), 2,
     "manifest does not match the schema", None),
    ("inspect-not-json", _damaged_bundle("inspect", lambda b: (b / "manifest.json").write_text("{")), 2,
     "manifest.json was altered", None),
    # -- adapters (verify, grads, train)
    ("adapter-truncated", _with_adapter("verify", raw=lambda p: p.write_bytes(p.read_bytes()[:100])), 2,
     "its safetensors file is damaged", None),
    ("adapter-random-bytes", _with_adapter("grads", raw=lambda p: p.write_bytes(os.urandom(2000))), 2,
     "its safetensors file is damaged", _no("g.safetensors")),
    ("adapter-missing-file", _with_adapter("verify", raw=lambda p: p.unlink()), 2,
     "adapter_model.safetensors is missing", None),
    ("adapter-extra-target", _with_adapter("grads", tensors=lambda t: {
        **t, "base_model.model.model.layers.0.mlp.extra_proj.lora_A.weight": torch.zeros(4, 64)}), 2,
     "tensor(s) the bundle does not train", _no("g.safetensors")),
    ("adapter-nan", _with_adapter("train", tensors=lambda t: _scale_first(t, math.nan)), 2, "NaN or infinite", _no("run")),
    ("adapter-inf", _with_adapter("verify", tensors=lambda t: _scale_first(t, math.inf)), 2, "NaN or infinite", None),
    ("adapter-other-alpha", _with_adapter("verify", config=lambda c: {**c, "lora_alpha": 32}), 2,
     "lora_alpha = 32, the bundle was built with LoRA alpha 16", None),
    ("adapter-other-rank", _with_adapter("train", config=lambda c: {**c, "r": 8}), 2, "LoRA rank 4", _no("run")),
    ("adapter-other-targets", _with_adapter("grads", config=lambda c: {**c, "target_modules": ["q_proj"]}), 2,
     "the adapter targets ['q_proj']", None),
    ("adapter-config-not-object", _with_adapter("verify", config=lambda c: [c]), 2, "is not a JSON object", None),
    # -- train
    ("train-lr-nan", _harness("train", "{bundle}", "--data", "{text}", "--steps", "1", "--lr", "nan", "--out",
                              "{tmp}/run"), 2, "--lr: nan is not a positive finite number", _no("run")),
    ("train-lr-inf", _harness("train", "{bundle}", "--data", "{text}", "--steps", "1", "--lr", "inf", "--out",
                              "{tmp}/run"), 2, "is not a positive finite number", _no("run")),
    ("train-lr-negative", _harness("train", "{bundle}", "--data", "{text}", "--steps", "1", "--lr", "-0.1", "--out",
                                   "{tmp}/run"), 2, "is not a positive finite number", _no("run")),
    ("train-steps-zero", _harness("train", "{bundle}", "--data", "{text}", "--steps", "0", "--out", "{tmp}/run"), 2,
     "--steps: 0 is not a positive integer", _no("run")),
    ("train-seed-negative", _harness("train", "{bundle}", "--data", "{text}", "--steps", "1", "--seed", "-3", "--out",
                                     "{tmp}/run"), 2, "--seed: -3 is not a non-negative integer", _no("run")),
    ("train-text-too-short", lambda ctx: ((ctx.tmp / "t.txt").write_text("h"), harness_main,
                                          ["train", str(ctx.bundle), "--data", str(ctx.tmp / "t.txt"), "--steps", "1",
                                           "--out", str(ctx.tmp / "run")])[1:], 2, "the text has 1 token(s)", _no("run")),
    ("train-out-is-the-bundle", _run_out("bundle"), 2, "a run never writes into a bundle", None),
    ("train-out-inside-the-bundle", _run_out("inside"), 2, "is inside the bundle", None),
    ("train-out-previous-run", _run_out("previous"), 2, "exists and is not empty; pass --overwrite", _previous_intact),
    ("train-bundle-file-missing", _damaged_bundle("train", lambda b: (b / "weights" / "final_norm.safetensors").unlink()),
     2, "final_norm.safetensors is missing", _no("run")),
    ("train-bundle-file-altered", _damaged_bundle(
        "train", lambda b: (b / "weights" / "layer_00.safetensors").write_bytes(os.urandom(64))), 2, "was altered",
     _no("run")),
    ("verify-bundle-weights-random-bytes", _damaged_bundle(
        "verify", lambda b: (b / "weights" / "layer_01.safetensors").write_bytes(os.urandom(4096)), resign=True), 2,
     "not a valid safetensors file", None),
    # -- verify and grads outputs
    ("verify-seed-negative", _harness("verify", "{bundle}", "--seed", "-1"), 2, "--seed: -1 is not a non-negative", None),
    ("verify-report-under-proc", _harness("verify", "{bundle}", "--report", "/proc/ondevice-lora/report.json"), 2,
     "cannot write --report", None),
    ("verify-report-is-a-folder", _harness("verify", "{bundle}", "--report", "{tmp}"), 2, "it is a folder", None),
    ("grads-out-under-proc", _harness("grads", "{bundle}", "--input-ids", "{ids}", "--out", "/proc/x/g.safetensors"), 2,
     "cannot write --out", None),
    ("grads-out-inside-the-bundle", _harness("grads", "{bundle}", "--input-ids", "{ids}", "--out",
                                             "{bundle}/g.safetensors"), 2, "is inside the bundle", None),
    # -- bench (checked before any build; no output folder left)
    ("bench-steps-zero", _harness("bench", "--model", "qwen2.5-0.5b", "--steps", "0", "--out", "{tmp}/bench"), 2,
     "--steps: 0 is not a positive integer", _no("bench")),
    ("bench-methods-unknown", _harness("bench", "--model", "qwen2.5-0.5b", "--methods", "mesp,sgd", "--out",
                                       "{tmp}/bench"), 2, "--methods: unknown method(s) sgd", _no("bench")),
    ("bench-quant-unknown", _harness("bench", "--model", "qwen2.5-0.5b", "--quant", "none,int3", "--out",
                                     "{tmp}/bench"), 2, "--quant: int3; choose a comma-separated subset", _no("bench")),
    ("bench-methods-empty", _harness("bench", "--model", "qwen2.5-0.5b", "--methods", ",", "--out", "{tmp}/bench"), 2,
     "(none given)", _no("bench")),
    ("bench-seq-len-one", _harness("bench", "--model", "qwen2.5-0.5b", "--seq-len", "1", "--out", "{tmp}/bench"), 2,
     "sequence length must be at least 2", _no("bench")),
    ("bench-convergence-negative", _harness("bench", "--model", "qwen2.5-0.5b", "--convergence-steps", "-1", "--out",
                                            "{tmp}/bench"), 2, "is not a non-negative integer", _no("bench")),
    ("bench-unknown-model", _harness("bench", "--model", "llama-9b", "--steps", "1", "--out", "{tmp}/bench"), 2,
     "unknown model 'llama-9b'", _no("bench")),
]


@pytest.mark.parametrize("make, code, fragment, check", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(make, code, fragment, check, tiny_checkpoint, ort_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ONDEVICE_LORA_CACHE", str(tmp_path / "cache"))
    ctx = Ctx(tmp_path, tiny_checkpoint, ort_bundle)
    main, argv = make(ctx)
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as e:  # argparse
        got = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code, err
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: ") and "Traceback" not in line
    assert fragment in line
    assert "Error:" not in line and "Exception" not in line, "an internal class name reached the user"
    assert not line.endswith(("...", "…")), "a message cut short"
    if check is not None:
        check(ctx)
    assert not list(tmp_path.rglob(".*.staging-*")), "a staging folder was left behind"
