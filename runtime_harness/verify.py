"""Prove a bundle's gradients: one step through the runtime vs transformers + PEFT + autograd in float64.

1. integrity: the manifest matches `manifest.sha256`; every file it lists exists with its sha256;
2. a seeded batch (token ids, labels with some -100) and a NONZERO LoRA adapter (PEFT's default
   B = 0 would make every A gradient zero and hide bugs), or the user's adapter;
3. the bundle's `train_step` schedule with lr = 0, keeping the LoRA gradients it would free;
4. the reference loss and gradients (`reference.layerwise_loss_and_grads`: float64, one decoder layer
   at a time, frozen weights from the checkpoint the bundle was built from, not from the bundle);
   per tensor: cosine and max relative error (max |ours - ref| / max |ref|).
   Pass: cosine >= 0.99999 and max relative error <= 1e-4, for every tensor and for the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.bundle_format import COSINE_MIN, REL_ERR_MAX, grad_of
from runtime_harness.runner import BundleError, BundleRunner



def seeded_batch(manifest: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids uniform over the vocabulary; labels = ids with a few positions set to -100."""
    rng = np.random.default_rng(seed)
    B, S, V = manifest["batch"], manifest["seq_len"], manifest["model"]["architecture"]["vocab_size"]
    ids = rng.integers(0, V, size=(B, S), dtype=np.int64)
    labels = ids.copy()
    labels[:, 0] = -100
    labels[:, rng.integers(1, S, size=max(1, S // 16))] = -100
    return ids, labels


def nonzero_adapter(manifest: dict, seed: int) -> dict[str, np.ndarray]:
    """PEFT-named LoRA tensors with A ~ U(+-1/sqrt(in)) (PEFT's A init) and B ~ N(0, 0.02^2), both nonzero."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for t in manifest["state"]:
        name = t["init"].get("adapter")
        if name is None:
            continue
        if name.endswith("lora_A.weight"):
            bound = 1.0 / np.sqrt(t["shape"][1])
            out[name] = rng.uniform(-bound, bound, size=t["shape"]).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(t["shape"]) * 0.02).astype(np.float32)
    return out


def check_batch(manifest: dict, input_ids: np.ndarray, labels: np.ndarray) -> None:
    shape = [manifest["batch"], manifest["seq_len"]]
    V = manifest["model"]["architecture"]["vocab_size"]
    for name, arr in (("input ids", input_ids), ("labels", labels)):
        if list(arr.shape) != shape:
            raise BundleError(f"{name} have shape {list(arr.shape)}; this bundle takes batch x sequence = {shape}")
    if input_ids.min() < 0 or input_ids.max() >= V:
        raise BundleError(f"token ids must be in [0, {V}); got values in [{input_ids.min()}, {input_ids.max()}]")
    bad = (labels != -100) & ((labels < 0) | (labels >= V))
    if bad.any():
        raise BundleError(f"labels must be -100 or in [0, {V}); got {labels[bad][0]}")


def check_adapter(manifest: dict, tensors: dict[str, np.ndarray]) -> None:
    """Every LoRA tensor of the bundle, of its shape and finite, and no other tensor."""
    wanted = {t["init"]["adapter"] for t in manifest["state"] if "adapter" in t["init"]}
    extra = sorted(set(tensors) - wanted)
    if extra:
        raise BundleError(f"the adapter has {len(extra)} tensor(s) the bundle does not train, e.g. {extra[0]} "
                          f"(LoRA targets {','.join(manifest['lora']['targets'])})")
    for t in manifest["state"]:
        name = t["init"].get("adapter")
        if name is None:
            continue
        if name not in tensors:
            raise BundleError(f"the adapter lacks {name} (LoRA targets {','.join(manifest['lora']['targets'])})")
        if list(tensors[name].shape) != t["shape"]:
            raise BundleError(f"adapter tensor {name} has shape {list(tensors[name].shape)}, the bundle needs "
                              f"{t['shape']} (rank {manifest['lora']['rank']})")
        if not np.isfinite(tensors[name]).all():
            raise BundleError(f"adapter tensor {name} holds NaN or infinite values")


def check_adapter_config(manifest: dict, config: dict) -> None:
    """The adapter's PEFT settings must be the bundle's: its scale alpha / r is baked into the graphs, so an
    adapter with another alpha, rank or targets would run with the bundle's, and its loss would not be its own."""
    lora = manifest["lora"]
    if not isinstance(config, dict):
        raise BundleError("the adapter's adapter_config.json is not a JSON object")
    from graphs.config import TARGET_MODULES

    modules = sorted(TARGET_MODULES[t].split(".")[-1] for t in lora["targets"])  # PEFT's names, as written
    theirs = config.get("target_modules")
    checks = [("r", config.get("r"), lora["rank"], "rank"), ("lora_alpha", config.get("lora_alpha"), lora["alpha"], "alpha")]
    for key, value, want, what in checks:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or float(value) != float(want):
            raise BundleError(f"the adapter has {key} = {value}, the bundle was built with LoRA {what} {want:g}; "
                              f"build a bundle with the adapter's settings")
    if isinstance(theirs, str) or sorted(theirs or []) != modules:
        raise BundleError(f"the adapter targets {theirs}, the bundle trains {','.join(modules)}; "
                          f"build a bundle with the adapter's targets")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise BundleError(f"the adapter sets {key}; per-module ranks and alphas are not supported")


def bundle_gradients(runner: BundleRunner, adapter: dict[str, np.ndarray], input_ids: np.ndarray,
                     labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and PEFT-named LoRA gradients of one `train_step` through the runtime (lr = 0)."""
    store = runner.initial_state(adapter)
    loss, _ = runner.step(store, input_ids, labels, lr=0.0, keep=lambda name: name.startswith("grad."))
    grads = {}
    for t in runner.manifest["state"]:
        peft_name = t["init"].get("adapter")
        if peft_name is not None:
            grads[peft_name] = np.asarray(store[grad_of(t["name"])])
    return loss, grads


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(cosine, max relative error = max|ours - ref| / max|ref|)."""
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    scale = np.abs(b).max()
    rel = float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())
    return cosine, rel


@dataclass
class Row:
    name: str
    cosine: float
    max_rel_err: float

    @property
    def ok(self) -> bool:
        return self.cosine >= COSINE_MIN and self.max_rel_err <= REL_ERR_MAX


def verify(bundle: Path, runtime: str | None = None, adapter: dict[str, np.ndarray] | None = None,
           seed: int = 0) -> dict:
    """Run steps 1-4; returns the report (report["ok"] tells pass/fail)."""
    from runtime_harness import reference

    runner = BundleRunner(bundle, runtime)
    manifest = runner.manifest
    adapter = adapter if adapter is not None else nonzero_adapter(manifest, seed)
    check_adapter(manifest, adapter)
    try:
        weights = reference.source_weights(manifest)
    except reference.ReferenceError as e:
        raise BundleError(str(e)) from None
    ids, labels = seeded_batch(manifest, seed)
    loss, grads = bundle_gradients(runner, adapter, ids, labels)
    ref_loss, ref_grads = reference.layerwise_loss_and_grads(manifest, weights, adapter, ids, labels)
    rows = [Row(name, *compare(grads[name], ref_grads[name])) for name in grads]
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    ok = loss_rel <= REL_ERR_MAX and all(r.ok for r in rows) and set(grads) == set(ref_grads)
    quantization = None
    if manifest["weights"].get("format") is not None:  # for information: how far from the float checkpoint
        float_loss, float_grads = reference.layerwise_loss_and_grads(
            manifest, reference.source_weights(manifest, dequantized=False), adapter, ids, labels)
        diffs = [compare(ref_grads[name], float_grads[name]) for name in ref_grads]
        quantization = {"format": manifest["weights"]["format"]["scheme"],
                        "group_size": manifest["weights"]["format"]["group_size"],
                        "float_loss": float_loss, "loss_rel_diff": abs(ref_loss - float_loss) / max(abs(float_loss), 1e-12),
                        "grads_min_cosine": min(d[0] for d in diffs), "grads_max_rel_diff": max(d[1] for d in diffs)}
    return {
        "bundle": str(bundle), "backend": manifest["backend"], "runtime": runner.backend.runtime or runner.backend.name,
        "seed": seed, "ok": ok,
        "reference": f"transformers {manifest['model']['hf_config'].get('model_type')} decoder layers + peft + "
                     f"autograd, float64, one layer at a time, weights from {manifest['weights']['source']}",
        "loss": loss, "reference_loss": ref_loss, "loss_rel_err": loss_rel, "loss_ok": loss_rel <= REL_ERR_MAX,
        "thresholds": {"cosine_min": COSINE_MIN, "max_rel_err": REL_ERR_MAX},
        "tensors": [{"name": r.name, "cosine": r.cosine, "max_rel_err": r.max_rel_err, "ok": r.ok} for r in rows],
        "worst": {"cosine": min(r.cosine for r in rows), "max_rel_err": max(r.max_rel_err for r in rows)},
        "quantization": quantization,
    }


def format_report(report: dict, limit: int | None = None) -> str:
    lines = [f"runtime: {report['runtime']}", f"{'tensor':<64} {'cosine':>12} {'max rel err':>12}  ok"]
    rows = report["tensors"]
    shown = rows if limit is None or len(rows) <= limit else sorted(rows, key=lambda r: -r["max_rel_err"])[:limit]
    for r in shown:
        lines.append(f"{r['name']:<64} {r['cosine']:>12.8f} {r['max_rel_err']:>12.3e}  {'yes' if r['ok'] else 'NO'}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more tensors (worst {len(shown)} shown; all in report.json)")
    lines.append(f"loss {report['loss']:.6f} vs reference {report['reference_loss']:.6f} "
                 f"(rel err {report['loss_rel_err']:.2e}){'' if report['loss_ok'] else '  NO'}")
    q = report.get("quantization")
    if q is not None:
        lines.append(f"for information, {q['format']} weights vs the float checkpoint (not part of the verdict): "
                     f"loss {report['reference_loss']:.6f} vs {q['float_loss']:.6f} (rel diff {q['loss_rel_diff']:.2e}), "
                     f"LoRA gradients min cosine {q['grads_min_cosine']:.6f}, max rel diff {q['grads_max_rel_diff']:.2e}")
    lines.append(f"worst: cosine {report['worst']['cosine']:.8f}, max rel err {report['worst']['max_rel_err']:.3e} "
                 f"over {len(rows)} LoRA tensors -> {'PASS' if report['ok'] else 'FAIL'}")
    return "\n".join(lines)
