"""Build a device bundle.

1. resolve: model spec (registry or checkpoint config.json), weights source, LoRA and step shapes;
2. stage: write everything into a temporary folder beside the output;
3. weights: one safetensors file per layer (backends that take weights as inputs), the embedding
   (zero-padded to whole vocabulary chunks) and the final norm, read one layer at a time;
4. graphs: trace each subgraph with torch.export and lower it with the backend (cached by content);
5. adapter: the initial LoRA adapter in PEFT format; backend training artifacts (ORT);
6. manifest: graphs, schedules, state, memory, sha256 of every file;
7. publish: rename the staged folder into place (an existing bundle is replaced only now).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from exporter import adapter as adapter_io
from exporter import graph_defs as gd
from exporter import schedule as sched
from exporter.backends import BACKEND_NAMES, get_backend
from exporter.cache import ArtifactCache, code_digest
from exporter.config import BuildConfig, default_out
from exporter.manifest import validate as validate_manifest
from exporter.registry import MODELS, UnsupportedModel, spec_from_hf_config
from exporter.weights import (FINAL_NORM, WeightsError, WeightSource, open_weights, read_hf_config,
                              resolve_checkpoint_folder)
from graphs.config import ModelSpec

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")


class BuildError(ValueError):
    """A build that cannot go ahead; the message is one line for the user."""


@dataclass
class Resolved:
    spec: ModelSpec
    weights: WeightSource
    checkpoint_folder: Path | None
    shapes: gd.StepShapes
    out: Path


def resolve(config: BuildConfig) -> Resolved:
    """Check every input before anything is written."""
    if config.backend not in BACKEND_NAMES:
        raise BuildError(f"unknown backend {config.backend!r}; choose from {', '.join(BACKEND_NAMES)}")
    if config.method not in gd.METHODS:
        raise BuildError(f"unknown method {config.method!r}; choose from {', '.join(gd.METHODS)}")
    if config.optimizer not in gd.OPTIMIZERS:
        raise BuildError(f"unknown optimizer {config.optimizer!r}; choose from {', '.join(gd.OPTIMIZERS)}")
    if config.vocab_chunk_rows <= 0 or config.mlp_blocks <= 0:
        raise BuildError("--vocab-chunk-rows and --mlp-blocks must be positive")
    try:
        spec, model_folder = _resolve_model(config.model)
        config.lora.validate_for(spec)
        weights_source = config.weights or (str(model_folder) if model_folder else spec.hf_repo)
        if weights_source is None:
            raise BuildError(f"{spec.name} names no checkpoint; pass --weights PATH or --weights random")
        weights = open_weights(weights_source, spec, config.seed)
    except (WeightsError, UnsupportedModel, ValueError) as e:
        raise BuildError(str(e)) from None
    checkpoint = getattr(weights, "folder", None)
    out = Path(config.out) if config.out else default_out(spec.name, config.backend)
    _check_writable(out)
    shapes = gd.StepShapes(spec, config.lora, config.method, config.optimizer, config.vocab_chunk_rows,
                           config.mlp_blocks)
    return Resolved(spec, weights, checkpoint, shapes, out)


def _resolve_model(model: str) -> tuple[ModelSpec, Path | None]:
    if model in MODELS:
        return MODELS[model], None
    looks_like_path = Path(model).expanduser().exists() or model.count("/") == 1
    if not looks_like_path:
        raise BuildError(f"unknown model {model!r}; choose from {', '.join(MODELS)}, or give a checkpoint folder "
                         f"or Hugging Face repo id")
    folder, description = resolve_checkpoint_folder(model)
    name = Path(model).expanduser().resolve().name if Path(model).expanduser().exists() else model
    return spec_from_hf_config(read_hf_config(folder), name, None if Path(model).expanduser().exists() else model), folder


def _check_writable(out: Path) -> None:
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise BuildError(f"cannot write to {out}: {existing} is not a writable folder")
    if out.exists() and not out.is_dir():
        raise BuildError(f"cannot write to {out}: it exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise BuildError(f"{out} exists and is not a bundle; refusing to replace it")


def _programs(r: Resolved, backend) -> dict:
    """Program name -> its graphs (or a function making them: a baked layer reads its weights only when
    it is lowered, not when its cached copy is reused), in build order."""
    s = r.shapes
    programs: dict[str, list] = {"embed": [gd.embed_chunk_graph(s)]}
    if backend.weights_in_graphs:
        for i in range(s.spec.num_layers):
            programs[sched.layer_program(i, True)] = _BakedLayer(i)
    else:
        programs["layer"] = [gd.layer_forward_graph(s), gd.layer_backward_graph(s)]
    programs["head"] = [gd.head_chunk_graph(s), gd.head_finish_graph(s)]
    programs["optimizer"] = [gd.optimizer_graph(s)]
    return programs


@dataclass(frozen=True)
class _BakedLayer:
    """A layer program with its frozen weights baked in: lowered by `Backend.lower_baked`."""

    index: int


def _layer_graphs(shapes: gd.StepShapes, weights: dict[str, torch.Tensor]) -> list[gd.GraphDef]:
    return [gd.layer_forward_graph(shapes, weights), gd.layer_backward_graph(shapes, weights)]


def _write_weights(r: Resolved, stage: Path, backend, cache: ArtifactCache, say) -> None:
    s = r.shapes
    (stage / "weights").mkdir(parents=True)
    base_key = {"weights": _weights_identity(r), "spec": s.spec.to_dict()}
    layers = [] if backend.weights_in_graphs else list(range(s.spec.num_layers))
    for i in tqdm(layers, desc="weights", unit="layer", disable=not say.progress, leave=False):
        key = cache.key({**base_key, "layer": i})
        target = stage / sched.layer_file(i)
        if not cache.fetch_file(key, target):
            save_file(r.weights.layer(i), str(target))
            cache.store_file(key, target)
    rows, count = s.chunk_rows, s.num_chunks
    head_names = [("weights/embedding.safetensors", "model.embed_tokens.weight")]
    if not s.spec.tie_word_embeddings:
        head_names.append((sched.LM_HEAD_FILE, "lm_head.weight"))
    for rel, name in head_names:
        key = cache.key({**base_key, "matrix": name, "rows": rows * count})
        target = stage / rel
        if not cache.fetch_file(key, target):
            padded = torch.zeros(rows * count, s.spec.hidden_size)
            step = 16384
            for start in range(0, s.spec.vocab_size, step):
                stop = min(start + step, s.spec.vocab_size)
                padded[start:stop] = r.weights.rows(name, start, stop)
            save_file({"weight": padded}, str(target))
            cache.store_file(key, target)
    save_file({"weight": r.weights.tensor(FINAL_NORM)}, str(stage / sched.FINAL_NORM_FILE))


def _weights_identity(r: Resolved) -> dict:
    """What determines the weight values: the source, plus file sizes and times for a checkpoint."""
    ident = {"source": r.weights.description}
    if r.checkpoint_folder is not None:
        ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                                for p in Path(r.checkpoint_folder).glob("*.safetensors"))
    return ident


def _lower_all(r: Resolved, stage: Path, backend, cache: ArtifactCache, say) -> dict[str, dict]:
    programs = _programs(r, backend)
    layer_graphs = functools.partial(_layer_graphs, r.shapes)  # one object per build: backends reuse work by it
    graphs: dict[str, dict] = {}
    (stage / "graphs").mkdir(parents=True, exist_ok=True)
    code = code_digest(backend)
    bar = tqdm(programs.items(), desc="graphs", unit="program", disable=not say.progress)
    for program, make in bar:
        bar.set_postfix_str(program)
        baked_layer = program.startswith("layer_")
        kind = "layer" if baked_layer else program
        key = cache.key({"backend": backend.name, "program": kind, "layer": program if baked_layer else None,
                         "settings": _program_settings(r.shapes, kind),
                         "weights": _weights_identity(r) if baked_layer else None, "code": code})
        lowered = cache.fetch_program(key, stage)
        if lowered is None:
            t0 = time.time()
            if isinstance(make, _BakedLayer):
                weights = r.weights.layer(make.index)
                lowered = [g.to_dict() | {"id": g.id} for g in backend.lower_baked(program, layer_graphs, weights, stage)]
                for g in lowered:
                    g["constant_bytes"] = sum(t.numel() * t.element_size() for t in weights.values())
            else:
                lowered = [g.to_dict() | {"id": g.id} for g in backend.lower(program, make, stage)]
                for g, d in zip(lowered, make):
                    g["constant_bytes"] = sum(t.numel() * t.element_size() for t in d.constants.values())
            say.detail(f"lowered {program} ({', '.join(g['method'] or g['id'] for g in lowered)}) "
                       f"in {time.time() - t0:.1f}s")
            cache.store_program(key, stage, lowered)
        for g in lowered:
            graphs[g.pop("id")] = g
    return graphs


def _program_settings(s: gd.StepShapes, kind: str) -> dict:
    """What determines a program's graphs (so that changing e.g. the method re-lowers only the layer program)."""
    common = {"tokens": s.tokens, "hidden": s.spec.hidden_size}
    if kind == "embed":
        return {**common, "chunk_rows": s.chunk_rows}
    if kind == "head":
        return {**common, "chunk_rows": s.chunk_rows, "vocab": s.spec.vocab_size, "eps": s.spec.rms_norm_eps}
    if kind == "optimizer":
        return {"lora": s.lora.layer_lora_shapes(s.spec), "optimizer": s.optimizer}
    return {"spec": s.spec.to_dict(), "lora": s.lora.to_dict(), "method": s.method, "mlp_blocks": s.mlp_blocks}


def _copy_tokenizer(r: Resolved, stage: Path) -> bool:
    if r.checkpoint_folder is None:
        return False
    found = [f for f in TOKENIZER_FILES if (Path(r.checkpoint_folder) / f).is_file()]
    if "tokenizer.json" not in found and "vocab.json" not in found:
        return False
    (stage / "tokenizer").mkdir()
    for f in found:
        shutil.copy2(Path(r.checkpoint_folder) / f, stage / "tokenizer" / f)
    return True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_files(root: Path) -> list[Path]:
    """Every file of a bundle except the manifest, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


class Reporter:
    def __init__(self, progress: bool = True, verbose: bool = False):
        self.progress, self.verbose = progress, verbose

    def detail(self, message: str) -> None:
        if self.verbose:
            tqdm.write(message, file=sys.stderr)


def build(config: BuildConfig, say: Reporter | None = None, cache: ArtifactCache | None = None) -> dict:
    """Build the bundle described by `config`; returns the manifest. Raises BuildError on bad input."""
    say = say or Reporter()
    r = resolve(config)
    backend = get_backend(config.backend)
    cache = cache or ArtifactCache.default()
    r.out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{r.out.name}.staging-", dir=r.out.parent))
    t0 = time.time()
    try:
        _write_weights(r, stage, backend, cache, say)
        graphs = _lower_all(r, stage, backend, cache, say)
        lora_init = adapter_io.init_lora(r.spec, config.lora, config.seed)
        base = r.spec.hf_repo or (str(r.checkpoint_folder) if r.checkpoint_folder else r.spec.name)
        adapter_io.write_adapter(stage / "adapter", lora_init, adapter_io.peft_config(r.spec, config.lora, base))
        lora_state = {sched.lora_state_name(i, n): lora_init[sched.peft_tensor_name(i, n)]
                      for i in range(r.spec.num_layers) for n in r.shapes.lora_names()}
        extra = backend.write_training_artifacts(r.shapes, lora_state, stage)
        has_tokenizer = _copy_tokenizer(r, stage)
        schedules = sched.build_schedules(r.shapes, graphs, backend.weights_in_graphs)
        manifest = _manifest(config, r, backend, graphs, schedules, extra, has_tokenizer)
        manifest["files"] = {str(p.relative_to(stage)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                             for p in bundle_files(stage)}
        manifest["build_seconds"] = round(time.time() - t0, 2)
        validate_manifest(manifest)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _publish(stage, r.out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    manifest["bundle_dir"] = str(r.out)
    return manifest


def _publish(stage: Path, out: Path) -> None:
    """Swap the staged folder into place; the old bundle is removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        stage.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(config: BuildConfig, r: Resolved, backend, graphs: dict, schedules: dict, extra: dict,
              has_tokenizer: bool) -> dict:
    s = r.shapes
    return {
        "format_version": FORMAT_VERSION,
        "model": {"name": r.spec.name, "architecture": r.spec.to_dict(), "hf_config": r.spec.to_hf_config()},
        "backend": backend.name,
        "dtype": "float32",
        "method": config.method,
        "optimizer": {"name": config.optimizer,
                      **({"adamw": vars(gd.optim_math.AdamWSettings())} if config.optimizer == "adamw" else {})},
        "seq_len": config.lora.seq_len,
        "batch": config.lora.batch,
        "lora": config.lora.to_dict() | {"scale": config.lora.scale,
                                          "trainable_parameters": config.lora.trainable_parameters(r.spec)},
        "vocab_chunk": {"rows": s.chunk_rows, "count": s.num_chunks},
        "weights": {"source": r.weights.description, "layers_in_graphs": backend.weights_in_graphs,
                    "embedding_padded_rows": s.chunk_rows * s.num_chunks},
        "adapter": "adapter",
        "tokenizer": "tokenizer" if has_tokenizer else None,
        "graphs": graphs,
        "step_inputs": sched.step_inputs(s),
        "step_outputs": ["loss"],
        "state": sched.state_tensors(s),
        "schedules": schedules,
        "memory": {name: sched.peak_memory(entries) for name, entries in schedules.items()},
        **extra,
    }
