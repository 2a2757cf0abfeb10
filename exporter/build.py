"""Build a device bundle.

1. resolve: model spec (registry or checkpoint config.json), weights source, LoRA and step shapes;
2. stage: write everything into a staging folder beside the output (named for this process; staging
   folders of builds that were killed are removed first; SIGTERM / SIGHUP clean up like Ctrl-C);
3. weights: one safetensors file per layer (backends that take weights as inputs), the embedding
   (zero-padded to whole vocabulary chunks) and the final norm, read one layer at a time;
4. graphs: trace each subgraph with torch.export and lower it with the backend (cached by content);
5. adapter: the initial LoRA adapter in PEFT format; backend training artifacts (ORT);
6. manifest: graphs, schedules, state, memory, sha256 of every file;
7. publish: rename the staged folder into place (an existing bundle is replaced only now).
"""
from __future__ import annotations

import functools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from exporter import adapter as adapter_io
from exporter import outputs
from exporter import graph_defs as gd
from exporter import integrity
from exporter.bundle_format import ADAPTER_DIR, FORMAT_VERSION, PAGED, TOKENIZER_DIR, TOKENIZER_FILES, weight_format
from exporter import schedule as sched
from exporter.backends import BACKEND_NAMES, get_backend
from exporter.budget import check_fits
from exporter.progress import progress, routed_warnings
from exporter.cache import ArtifactCache, CacheError, code_digest
from exporter.config import DELEGATES, BuildConfig, default_out, delegate_of
from exporter.flops import graph_flops
from exporter.manifest import validate as validate_manifest
from exporter.registry import MODELS, UnsupportedModel, spec_from_hf_config
from exporter.weights import (FINAL_NORM, WeightsError, WeightSource, open_weights, read_hf_config,
                              resolve_checkpoint_folder)
from graphs import quant
from graphs.config import ModelSpec, default_mlp_blocks


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
    for flag, value in (("--vocab-chunk-rows", config.vocab_chunk_rows), ("--mlp-blocks", config.mlp_blocks)):
        if value is None and flag == "--mlp-blocks":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BuildError(f"{flag} must be a positive integer, got {value}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise BuildError(f"--seed must be a non-negative integer, got {config.seed}")
    check_delegate(config)
    try:
        spec, model_folder = _resolve_model(config.model)
        out = outputs.resolve_out(config.out or default_out(spec.name, config.backend))
        outputs.check_creatable(out)
        outputs.check_replaceable(out)
        fmt = quant.QuantFormat.make(config.quant, config.quant_group_size)
        backend = get_backend(config.backend).with_delegate(delegate_of(config))
        mlp_blocks = config.mlp_blocks or min(default_mlp_blocks(config.lora.batch * config.lora.seq_len, spec),
                                              spec.intermediate_size)
        split = config.method == "mesp" and not backend.weights_in_graphs  # sub-layer calls (graphs.sublayer)
        shapes = gd.StepShapes(spec, config.lora, config.method, config.optimizer, config.vocab_chunk_rows,
                               mlp_blocks, fmt, backend.head_block_rows, split_layers=split)
        check_trainable(shapes)
        check_quantizable(shapes)
        weights_source = config.weights or (str(model_folder) if model_folder else spec.hf_repo)
        if weights_source is None:
            raise BuildError(f"{spec.name} names no checkpoint; pass --weights PATH or --weights random")
        weights = open_weights(weights_source, spec, config.seed)
        checkpoint = getattr(weights, "folder", None)
        _check_positions(config.lora.seq_len, spec, checkpoint or model_folder)
    except (WeightsError, UnsupportedModel, ValueError) as e:
        raise BuildError(str(e)) from None
    return Resolved(spec, weights, checkpoint, shapes, out)


def check_delegate(config: BuildConfig) -> None:
    """Refuse (BuildError, one line) a delegate the backend does not have: `--delegate` is for ExecuTorch."""
    if config.delegate is None:
        return
    names = DELEGATES.get(config.backend)
    if names is None:
        raise BuildError(f"--delegate is for executorch bundles only; the {config.backend} backend has no delegates")
    if config.delegate not in names:
        raise BuildError(f"unknown delegate {config.delegate!r}; choose from {', '.join(names)}")


def check_trainable(shapes: gd.StepShapes) -> None:
    """Refuse (ValueError, one line) settings that cannot train this architecture or cannot fit on a phone.

    (Zero trainable parameters cannot happen: LoraConfig requires a positive rank and at least one target,
    and the checkpoint is checked to hold every target's weights.)"""
    spec = shapes.spec
    shapes.lora.validate_for(spec)
    if shapes.mlp_blocks > spec.intermediate_size:
        raise ValueError(f"--mlp-blocks {shapes.mlp_blocks} is larger than the MLP's {spec.intermediate_size} "
                         f"channels")
    check_fits(shapes)


def check_quantizable(shapes: gd.StepShapes) -> None:
    """Refuse (ValueError, one line) a quantization whose groups do not tile every quantized matrix."""
    if shapes.quant is None:
        return
    spec = shapes.spec
    for name, shape in spec.layer_weight_shapes().items():
        if quant.is_quantized_matrix(name, shape):
            shapes.quant.check(name, shape)
    shapes.quant.check("the embedding", (spec.vocab_size, spec.hidden_size))


def _check_positions(seq_len: int, spec: ModelSpec, folder: Path | None) -> None:
    """The sequence length must not exceed the positions the checkpoint was trained for."""
    limit = spec.to_hf_config().get("max_position_embeddings")
    if folder is not None:
        config = read_hf_config(Path(folder))
        limit = config.get("max_position_embeddings", limit) if isinstance(config, dict) else limit
    if isinstance(limit, int) and not isinstance(limit, bool) and seq_len > limit:
        raise BuildError(f"--seq-len {seq_len} is longer than the checkpoint's max_position_embeddings ({limit})")


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


@dataclass(frozen=True)
class Program:
    """One program file of the bundle, as the manifest's graph entries describe it (structured fields, so
    that nothing reads meaning out of names): `role` embed / layer / head / optimizer; a layer program
    serves layers of one `attention` kind, and only layer `layer` when its frozen weights are baked in."""

    name: str
    role: str
    layer: int | None = None
    attention: str | None = None


def _programs(r: Resolved, backend) -> list[tuple[Program, list[gd.GraphDef] | None]]:
    """Every program with its graphs, in build order. A baked layer's graphs are None: they are made from
    its weights only when it is lowered, not when its cached copy is reused."""
    s = r.shapes
    spec = s.spec
    programs: list[tuple[Program, list | None]] = [(Program("embed", "embed"), [gd.embed_chunk_graph(s)])]
    if backend.weights_in_graphs:
        for i in range(spec.num_layers):
            programs.append((Program(sched.layer_program(spec, i, True), "layer", i, spec.layer_types[i]), None))
    else:
        first = {kind: spec.layer_types.index(kind) for kind in spec.attention_kinds}
        for kind, i in first.items():
            programs.append((Program(sched.layer_program(spec, i, False), "layer", None, kind),
                             gd.layer_graphs(s, kind)))
    programs.append((Program("head", "head"), [gd.head_chunk_graph(s), gd.head_finish_graph(s)]))
    programs.append((Program("optimizer", "optimizer"), [gd.optimizer_graph(s)]))
    return programs


def stored_layer(r: Resolved, i: int) -> dict[str, torch.Tensor]:
    """Layer i's frozen tensors as the bundle stores them (`StepShapes.layer_stored`: quantized where asked, the
    down projection's tensors transposed in a split bundle)."""
    out = {}
    for name, t in quant.quantize_layer(r.weights.layer(i), r.shapes.quant).items():
        name, transposed = r.shapes.as_stored(name)
        out[name] = t.T.contiguous() if transposed else t
    return out


def _quant_key(s: gd.StepShapes) -> dict | None:
    return None if s.quant is None else s.quant.to_dict()


def _write_weights(r: Resolved, stage: Path, backend, cache: ArtifactCache, say) -> None:
    s = r.shapes
    (stage / "weights").mkdir(parents=True)
    base_key = {"weights": r.weights.identity(), "spec": s.spec.to_dict(), "quant": _quant_key(s)}
    layers = [] if backend.weights_in_graphs else list(range(s.spec.num_layers))
    for i in progress(layers, "weights", "layers", say.mode, leave=False):
        key = cache.key({**base_key, "layer": i, "split_layers": s.split_layers})
        target = stage / sched.layer_file(i)
        if not cache.fetch_file(key, target):
            save_file(stored_layer(r, i), str(target))
            cache.store_file(key, target)
    rows, count = s.chunk_rows, s.num_chunks
    head_names = [("weights/embedding.safetensors", "model.embed_tokens.weight")]
    if not s.spec.tie_word_embeddings:
        head_names.append((sched.LM_HEAD_FILE, "lm_head.weight"))
    for rel, name in head_names:
        key = cache.key({**base_key, "matrix": name, "rows": rows * count})
        target = stage / rel
        if not cache.fetch_file(key, target):
            save_file(_padded_matrix(r, name, rows * count), str(target))
            cache.store_file(key, target)
    save_file({"weight": r.weights.tensor(FINAL_NORM)}, str(stage / sched.FINAL_NORM_FILE))


def _padded_matrix(r: Resolved, name: str, padded_rows: int) -> dict[str, torch.Tensor]:
    """The embedding / LM head zero-padded to whole vocabulary chunks, as stored (`StepShapes.matrix_stored`):
    read and quantized 16384 rows at a time (quantization is row-independent)."""
    s = r.shapes
    out = {n: torch.zeros(shape, dtype=getattr(torch, dtype))
           for n, (shape, dtype) in s.matrix_stored(padded_rows).items()}
    step = 16384
    for start in range(0, padded_rows, step):
        stop = min(start + step, padded_rows)
        block = torch.zeros(stop - start, s.spec.hidden_size)
        if start < s.spec.vocab_size:
            real = min(stop, s.spec.vocab_size)
            block[:real - start] = r.weights.rows(name, start, real)
        parts = {"weight": block} if s.quant is None else quant.quantize(block, s.quant)
        for n, t in parts.items():
            out[n][start:stop] = t
    return out


def _lower_all(r: Resolved, stage: Path, backend, cache: ArtifactCache, say) -> dict[str, dict]:
    programs = _programs(r, backend)
    # one graph maker per layer kind and build: a backend may convert a kind once and reuse it (Core ML)
    makers = {kind: functools.partial(gd.layer_graphs, r.shapes, kind) for kind in r.shapes.spec.attention_kinds}
    graphs: dict[str, dict] = {}
    flops = _LayerFlops(r.shapes)
    (stage / "graphs").mkdir(parents=True, exist_ok=True)
    code = code_digest(backend)
    bar = progress(programs, "graphs", "programs", say.mode)
    for program, made in bar:
        bar.set_postfix_str(program.name)
        baked = made is None
        key = cache.key({"backend": backend.name, "delegate": backend.delegate, "program": program.role,
                         "layer": program.layer,
                         "settings": _program_settings(r.shapes, program),
                         "weights": r.weights.identity() if baked else None, "code": code})
        lowered = cache.fetch_program(key, stage)
        if lowered is None:
            t0 = time.time()
            if baked:
                weights = stored_layer(r, program.layer)
                lowered = [g.to_dict() | {"id": g.id}
                           for g in backend.lower_baked(program.name, makers[program.attention], weights, stage)]
                for g in lowered:
                    g["constant_bytes"] = sum(t.numel() * t.element_size() for t in weights.values())
            else:
                lowered = [g.to_dict() | {"id": g.id} for g in backend.lower(program.name, made, stage)]
                for g, d in zip(lowered, made):
                    g["constant_bytes"] = sum(t.numel() * t.element_size() for t in d.constants.values())
            say.detail(f"lowered {program.name} ({', '.join(g['method'] or g['id'] for g in lowered)}) "
                       f"in {time.time() - t0:.1f}s")
            cache.store_program(key, stage, lowered)
        counts = flops[program.attention] if baked else [graph_flops(d) for d in made]
        for g, count in zip(lowered, counts):
            graph_id = g.pop("id")
            graphs[graph_id] = {**g, "program": program.name, "role": program.role,
                                "kind": graph_id[len(program.name) + 1:], "layer": program.layer,
                                "attention": program.attention, "flops": count}
    return graphs


class _LayerFlops(dict):
    """attention kind -> FLOPs of [layer_forward, layer_backward], counted once per kind from the
    weights-as-inputs graphs (a baked layer multiplies the same shapes)."""

    def __init__(self, shapes: gd.StepShapes):
        super().__init__()
        self.shapes = shapes

    def __missing__(self, kind: str) -> list[int]:
        self[kind] = [graph_flops(g) for g in gd.layer_graphs(self.shapes, kind)]
        return self[kind]


def _program_settings(s: gd.StepShapes, program: Program) -> dict:
    """What determines a program's graphs (so that changing e.g. the method re-lowers only the layer program)."""
    common = {"tokens": s.tokens, "hidden": s.spec.hidden_size, "quant": _quant_key(s)}
    fam = s.family
    if program.role == "embed":
        return {**common, "chunk_rows": s.chunk_rows, "scale_embedding": fam.scale_embedding}
    if program.role == "head":
        return {**common, "chunk_rows": s.chunk_rows, "vocab": s.spec.vocab_size, "eps": s.spec.rms_norm_eps,
                "norm_offset": fam.norm_offset, "head_rows": s.head_rows}
    if program.role == "optimizer":
        return {"lora": s.lora.layer_lora_shapes(s.spec), "optimizer": s.optimizer}  # (no frozen weights)
    return {"spec": s.spec.to_dict(), "lora": s.lora.to_dict(), "method": s.method, "mlp_blocks": s.mlp_blocks,
            "query_rows": s.query_rows, "attention": program.attention, "quant": _quant_key(s),
            "split_layers": s.split_layers}


def _copy_tokenizer(r: Resolved, stage: Path) -> bool:
    if r.checkpoint_folder is None:
        return False
    found = [f for f in TOKENIZER_FILES if (Path(r.checkpoint_folder) / f).is_file()]
    if "tokenizer.json" not in found and "vocab.json" not in found:
        return False
    (stage / TOKENIZER_DIR).mkdir()
    for f in found:
        shutil.copy2(Path(r.checkpoint_folder) / f, stage / TOKENIZER_DIR / f)
    return True


class Reporter:
    """How a build reports: `progress` True (a bar), False (nothing), or a mode of `exporter.progress`
    ("bar", "lines" for logs and CI, "off"); `verbose` adds per-program timings."""

    def __init__(self, progress: bool | str = True, verbose: bool = False):
        self.mode = progress if isinstance(progress, str) else ("bar" if progress else "off")
        self.verbose = verbose

    @property
    def progress(self) -> bool:
        return self.mode != "off"

    def detail(self, message: str) -> None:
        if self.verbose:
            tqdm.write(message, file=sys.stderr)


def build(config: BuildConfig, say: Reporter | None = None, cache: ArtifactCache | None = None) -> dict:
    """Build the bundle described by `config`; returns the manifest. Raises BuildError on bad input."""
    say = say or Reporter()
    r = resolve(config)
    backend = get_backend(config.backend).with_delegate(delegate_of(config))
    cache = cache or ArtifactCache.default()
    with outputs.signals_interrupt():
        try:
            outputs.remove_stale(r.out)
            stage = outputs.staging_dir(r.out)
        except OSError as e:
            raise BuildError(f"cannot write to {r.out}: {e.strerror or e}") from None
        try:
            with routed_warnings():
                manifest = _build_in(stage, config, r, backend, cache, say)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    manifest["bundle_dir"] = str(r.out)
    return manifest


def _build_in(stage: Path, config: BuildConfig, r: Resolved, backend, cache: ArtifactCache, say) -> dict:
    """Steps 3-7 into `stage`; failures the user can act on become one-line BuildErrors."""
    t0 = time.time()
    try:
        _write_weights(r, stage, backend, cache, say)
        graphs = _lower_all(r, stage, backend, cache, say)
        if cache.discarded:
            tqdm.write(f"note: {len(cache.discarded)} build-cache entries did not match their recorded sha256 "
                       f"and were rebuilt", file=sys.stderr)
        lora_init = adapter_io.init_lora(r.spec, config.lora, config.seed)
        base = r.spec.hf_repo or (str(r.checkpoint_folder) if r.checkpoint_folder else r.spec.name)
        adapter_io.write_adapter(stage / ADAPTER_DIR, lora_init, adapter_io.peft_config(r.spec, config.lora, base))
        lora_state = {sched.lora_state_name(i, n): lora_init[sched.peft_tensor_name(i, n)]
                      for i in range(r.spec.num_layers) for n in r.shapes.lora_names()}
        extra = backend.write_training_artifacts(r.shapes, lora_state, stage)
        has_tokenizer = _copy_tokenizer(r, stage)
        schedules = sched.build_schedules(r.shapes, graphs, backend.weights_in_graphs)
        if "ort_training" in extra:
            schedules["train_step_ort_api"] = sched.ort_api_schedule(r.shapes, graphs, extra["ort_training"]["parameters"])
        manifest = _manifest(config, r, backend, graphs, schedules, extra, has_tokenizer)
        manifest["files"] = integrity.file_entries(stage)
        manifest["build_seconds"] = round(time.time() - t0, 2)
        validate_manifest(manifest)
        integrity.write_manifest(stage, manifest)
        _publish(stage, r.out)
    except WeightsError as e:  # a tensor that cannot be read
        raise BuildError(str(e)) from None
    except CacheError as e:
        raise BuildError(str(e)) from None
    except (OSError, SafetensorError) as e:  # a full disk, an output that went away
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
        raise BuildError(f"cannot write the bundle {r.out}: {reason}") from None
    return manifest


def _publish(stage: Path, out: Path) -> None:
    """Swap the staged folder into place; the old bundle is removed only after the new one is there."""
    old = None
    with outputs.signals_deferred():  # the two renames are not interrupted half-way
        if out.exists():
            old = outputs.aside_name(out)
            out.rename(old)
        try:
            stage.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _hf_config(r: Resolved) -> dict:
    """The checkpoint's own config.json, unchanged; the registry's published fields where there is none."""
    if r.checkpoint_folder is not None:
        return read_hf_config(Path(r.checkpoint_folder))
    return r.spec.to_hf_config()


def _manifest(config: BuildConfig, r: Resolved, backend, graphs: dict, schedules: dict, extra: dict,
              has_tokenizer: bool) -> dict:
    s = r.shapes
    return {
        "format_version": FORMAT_VERSION,
        "model": {"name": r.spec.name, "architecture": r.spec.to_dict(), "hf_config": _hf_config(r)},
        "backend": backend.name,
        "delegate": backend.delegate,
        "dtype": "float32",
        "method": config.method,
        "optimizer": {"name": config.optimizer,
                      **({"adamw": vars(gd.optim_math.AdamWSettings())} if config.optimizer == "adamw" else {})},
        "seq_len": config.lora.seq_len,
        "batch": config.lora.batch,
        "lora": config.lora.to_dict() | {"scale": config.lora.scale,
                                          "trainable_parameters": config.lora.trainable_parameters(r.spec)},
        "vocab_chunk": {"rows": s.chunk_rows, "count": s.num_chunks},
        "weights": {"source": r.weights.description, "sha256": r.weights.content_sha256(),
                    "layers_in_graphs": backend.weights_in_graphs,
                    "embedding_padded_rows": s.chunk_rows * s.num_chunks,
                    **({} if s.quant is None else {"format": weight_format(s.quant)})},
        "adapter": ADAPTER_DIR,
        "paged": list(PAGED),
        "tokenizer": TOKENIZER_DIR if has_tokenizer else None,
        "graphs": graphs,
        "step_inputs": sched.step_inputs(s),
        "step_outputs": ["loss"],
        "state": sched.state_tensors(s),
        "schedules": schedules,
        "memory": {name: sched.peak_memory(entries) for name, entries in schedules.items()},
        **extra,
    }
