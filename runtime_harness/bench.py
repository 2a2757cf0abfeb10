"""Side-by-side benchmark: MeSP against MeBP, plain autograd and MeZO, on the same model, batch and LoRA init.

1. bundles: the model exported with `--method mesp` and `--method mebp` for one runtime (cached builds), once
   per frozen-weight format asked for (`quants`: none = float32, int8, int4; mesp and mebp of a quantized
   format are reported as `mesp-int4`, ...; autograd and mezo run once, on the first format's weights);
2. each method runs in its own fresh subprocess (`python -m runtime_harness.bench`): load, take the
   RSS baseline, then a warm-up step and `steps` timed steps; peak RSS above the baseline is the
   measured memory; the LoRA gradient of the first step is saved for the gradient-quality check:
     mesp, mebp  the bundle's `train_step` schedule through the runtime (SGD);
     autograd    transformers + peft, eager PyTorch, whole-model backward (SGD);
     mezo        SPSA on the LoRA tensors through the bundle's `eval_loss` schedule: two forward passes
                 per step with a seeded perturbation z, g = (L(t + eps z) - L(t - eps z)) / (2 eps) z;
3. gradient quality: cosine between each method's gradient and autograd's (the exact one);
4. convergence: a tiny model trained on real text with mesp and with mezo; loss curves in one PNG;
5. memory per call of one step for mesp and mebp (each format) on one figure;
6. speed (`runtime_harness.speed`): each method's step FLOPs (from the manifest's per-graph counts;
   autograd's counted on its warm-up step), achieved GFLOP/s and its fraction of the float32 GEMM
   throughput measured in this process before and after the methods ran (the best of the two), time per
   call of one step (plot) and summed per graph ("where the time goes"); one thread count
   (`exporter.threads`) for every runtime, the GEMM probe and the autograd baseline;
7. bench.json + bench.md (ratios to autograd and to mebp), all from this one run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from exporter.threads import set_threads, threads
from runtime_harness import speed
from runtime_harness.runner import BundleError, BundleRunner

METHODS = ("mesp", "mebp", "autograd", "mezo")
MEZO_EPS = 1e-3
MEZO_LR = 1e-3  # tuned on the convergence model (1e-4 barely moves, 1e-2 diverges)
CONVERGENCE_WINDOWS = 4  # both methods cycle over the same few windows, so the curves show fitting, not data noise


# ----------------------------------------------------------------------------- worker (subprocess)

def _rss() -> dict[str, int]:
    from runtime_harness.memory import _proc_status

    return _proc_status()


def _flat(grads: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(grads[n], dtype=np.float64).ravel() for n in names])


def _mezo_step(runner: BundleRunner, store: dict, lora_names: list[tuple[str, str]], ids, labels, lr: float,
               seed: int) -> tuple[float, dict[str, np.ndarray]]:
    """One MeZO step (in-place perturbations regenerated from `seed`); returns (loss, gradient estimate)."""
    def perturb(scale: float) -> None:
        rng = np.random.default_rng(seed)
        for state_name, _ in lora_names:
            runner.put(store, state_name, np.asarray(store[state_name])
                       + np.float32(scale) * rng.standard_normal(store[state_name].shape, dtype=np.float32))

    perturb(+MEZO_EPS)
    loss_plus, _ = runner.step(store, ids, labels, 0.0, schedule="eval_loss")
    perturb(-2 * MEZO_EPS)
    loss_minus, _ = runner.step(store, ids, labels, 0.0, schedule="eval_loss")
    perturb(+MEZO_EPS)
    projected = (loss_plus - loss_minus) / (2 * MEZO_EPS)
    rng = np.random.default_rng(seed)
    grads = {}
    for state_name, peft_name in lora_names:
        z = rng.standard_normal(store[state_name].shape, dtype=np.float32)
        grads[peft_name] = projected * z
        runner.put(store, state_name, np.asarray(store[state_name]) - np.float32(lr * projected) * z)
    return (loss_plus + loss_minus) / 2, grads


def worker(method: str, bundle: Path, steps: int, lr: float, seed: int, grads_out: Path) -> dict:
    """Runs in a fresh process; prints nothing but returns the measurements."""
    import gc

    from exporter.threads import set_threads, threads
    from runtime_harness.memory import _reset_peak

    set_threads(threads())  # the driver's count, for torch and every runtime
    from runtime_harness.verify import nonzero_adapter, seeded_batch

    runner = BundleRunner(bundle)
    manifest = runner.manifest
    adapter = nonzero_adapter(manifest, seed)
    ids, labels = seeded_batch(manifest, seed)
    names = sorted(adapter)
    if method == "autograd":
        import peft  # noqa: F401  (the baseline counts the libraries, not the model)
        import torch
        import transformers  # noqa: F401

        from runtime_harness import reference

        gc.collect()
        baseline = _rss()["VmRSS"]  # the whole model's weights count: that is what autograd holds
        model = reference.peft_model(reference.whole_model(manifest, dtype=torch.float32), manifest, adapter)
        params = [p for n, p in model.named_parameters() if p.requires_grad]

        def one_step():
            loss, grads = reference.whole_model_loss_and_grads(model, ids, labels)
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
            return loss, grads, []
    else:
        from runtime_harness.memory import _import_runtime

        _import_runtime(manifest["backend"])
        gc.collect()
        baseline = _rss()["VmRSS"]  # the runtime, no graph: the runtime's buffers for the graphs count
        runner.load_all()
        store = runner.initial_state(adapter)
        lora_names = [(t["name"], t["init"]["adapter"]) for t in manifest["state"] if "adapter" in t["init"]]
        counter = iter(range(10 ** 9))

        def one_step():
            if method == "mezo":
                loss, grads = _mezo_step(runner, store, lora_names, ids, labels, lr, seed * 1000 + next(counter))
                return loss, grads, []
            loss, trace = runner.step(store, ids, labels, lr, keep=lambda n: n.startswith("grad."))
            grads = {peft_name: np.asarray(store.pop("grad." + state[len("lora."):])) for state, peft_name in lora_names}
            return loss, grads, [{"graph": c.graph, "layer": c.layer, "seconds": c.seconds} for c in trace.calls]

    _reset_peak()
    times, losses, first_grads, calls, step_flops = [], [], None, [], None
    for k in range(steps + 1):  # step 0 is the warm-up
        if k == 0 and method == "autograd":  # the baseline's FLOPs, counted on its warm-up step
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                loss, grads, _ = one_step()
            step_flops = int(counter.get_total_flops())
        else:
            t0 = time.perf_counter()
            loss, grads, step_calls = one_step()
            if k > 0:
                times.append(time.perf_counter() - t0)
                if not calls or sum(c["seconds"] for c in step_calls) < sum(c["seconds"] for c in calls):
                    calls = step_calls  # the fastest timed step's calls (the least disturbed by the machine)
        if first_grads is None:
            first_grads = grads
        losses.append(loss)
        if k == 0:  # the peak of the timed steps: the warm-up's one-time allocations stay out
            gc.collect()
            _reset_peak()
    peak = _rss()["VmHWM"] - baseline
    np.save(grads_out, _flat(first_grads, names).astype(np.float32))
    return {"method": method, "peak_measured_bytes": int(peak), "step_times_s": times,
            "step_time_s": float(np.median(times)), "losses": losses, "baseline_rss_bytes": baseline,
            "calls": calls, "step_flops": step_flops, "threads": threads()}


# ----------------------------------------------------------------------------- driver

def _run_worker(method: str, bundle: Path, steps: int, lr: float, seed: int, out: Path, name: str | None = None
                ) -> dict:
    grads_path = out / f"grads-{name or method}.npy"
    cmd = [sys.executable, "-m", "runtime_harness.bench", method, str(bundle), str(steps), repr(lr), str(seed),
           str(grads_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"bench worker for {method} failed: {tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["grads_file"] = str(grads_path)
    return result


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _times(k: int, v: int | None) -> int | None:
    return None if v is None else k * v


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def label(method: str, quant: str) -> str:
    """A result's name: `mesp` (float32 weights) or `mesp-int4`."""
    return method if quant == "none" else f"{method}-{quant}"


def build_bundles(model: str, runtime: str, seq_len: int, weights: str | None, out: Path, say,
                  quants: tuple[str, ...] = ("none",), methods: tuple[str, ...] = ("mesp", "mebp")) -> dict[str, Path]:
    """{label: bundle} for each of `methods` (mesp, mebp) in every format of `quants`."""
    from exporter.build import Reporter, build
    from exporter.config import BuildConfig
    from graphs.config import LoraConfig

    bundles = {}
    for quant in quants:
        for method in methods:
            name = label(method, quant)
            path = out / "bundles" / f"{Path(model).name}-{runtime}-{name}"
            say(f"building {name} bundle ({runtime}) -> {path}")
            build(BuildConfig(model=model, backend=runtime, out=path, weights=weights, method=method, quant=quant,
                              lora=LoraConfig(seq_len=seq_len)), Reporter(progress=False))
            bundles[name] = path
    return bundles


def convergence(runtime: str, out: Path, steps: int, say) -> dict:
    """A tiny Qwen2 trained on real text (Python's own LICENSE) with mesp and with mezo; one loss plot."""
    import torch
    import transformers

    from exporter.build import Reporter, build
    from exporter.config import BuildConfig
    from graphs.config import LoraConfig
    from runtime_harness.train import plot_losses, tokenize, windows

    ckpt = out / "convergence" / "tiny-qwen2"
    if not (ckpt / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.Qwen2Config(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        transformers.Qwen2ForCausalLM(config).save_pretrained(str(ckpt))
    bundle = out / "convergence" / f"bundle-{runtime}"
    build(BuildConfig(model=str(ckpt), backend=runtime, out=bundle, optimizer="adamw",
                      lora=LoraConfig(rank=8, seq_len=64), vocab_chunk_rows=128), Reporter(progress=False))
    text_path = Path(os.__file__).parent / "LICENSE.txt"
    runner = BundleRunner(bundle)
    data = windows(tokenize(bundle, runner.manifest, text_path.read_text()), 1, 64)[:CONVERGENCE_WINDOWS]
    from exporter.adapter import read_adapter

    adapter = {k: v.numpy() for k, v in read_adapter(bundle / "adapter")[1].items()}
    lora_names = [(t["name"], t["init"]["adapter"]) for t in runner.manifest["state"] if "adapter" in t["init"]]
    curves = {}
    for method in ("mesp", "mezo"):
        store = runner.initial_state(adapter)
        losses = []
        for k in range(steps):
            batch = data[k % len(data)]
            if method == "mesp":
                loss, _ = runner.step(store, batch, batch, 3e-3)
            else:
                loss, _ = _mezo_step(runner, store, lora_names, batch, batch, MEZO_LR, 10_000 + k)
            losses.append(loss)
        curves[method] = losses
        say(f"convergence {method}: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f} (mean of last 10)")
    plot_losses({"MeSP (backprop, AdamW lr 3e-3)": curves["mesp"], f"MeZO (SPSA, SGD lr {MEZO_LR:g})": curves["mezo"]},
                out / "convergence.png", f"tiny Qwen2 on {text_path.name}, sequence 64")
    return {"text": str(text_path), "steps": steps, "curves": curves}


def bench(model: str, runtime: str, methods: list[str], seq_len: int, out: Path, steps: int = 3,
          weights: str | None = "random", lr: float = 1e-3, seed: int = 0, convergence_steps: int = 150,
          say=print, quants: tuple[str, ...] = ("none",)) -> dict:
    from graphs.quant import SCHEMES
    from runtime_harness.memory import measure, plot_split, plot_timeline

    unknown = [m for m in methods if m not in METHODS] + [q for q in quants if q not in SCHEMES]
    if unknown or not quants or len(set(quants)) != len(quants):
        raise BundleError(f"unknown or repeated method(s) / format(s) {unknown or list(quants)}; choose from "
                          f"{', '.join(METHODS)} and {', '.join(SCHEMES)}")
    out.mkdir(parents=True, exist_ok=True)
    n_threads = set_threads(threads())  # one count for the GEMM probe, every runtime and the baseline
    needed = {"mebp" if m == "mebp" else "mesp" for m in methods}  # mezo and autograd read the mesp bundle
    built = tuple(m for m in ("mesp", "mebp") if m in needed)
    bundles = build_bundles(model, runtime, seq_len, weights, out, say, quants, built)
    manifests = {m: json.loads((bundles[m] / "manifest.json").read_text()) for m in bundles}
    gemm_shape = speed.widest_product(next(iter(manifests.values())))
    gemm = [speed.gemm_throughput(*gemm_shape)]
    say(f"float32 GEMM {'x'.join(map(str, gemm_shape))} with {n_threads} thread(s): {gemm[0] / 1e9:.1f} GFLOP/s")
    runs = [(label(m, q), m, q) for m in methods for q in (quants if m in ("mesp", "mebp") else quants[:1])]
    # the bundle each run reads (mezo and autograd: the mesp bundle of their format)
    bundle_of = {name: label("mebp" if method == "mebp" else "mesp", quant) for name, method, quant in runs}
    results = {}
    for name, method, quant in runs:
        say(f"running {name} ({steps} timed steps after a warm-up, fresh process)")
        r = _run_worker(method, bundles[bundle_of[name]], steps, lr, seed, out, name)
        manifest = manifests[bundle_of[name]]
        m = manifest["memory"]
        planned = {"mesp": m["train_step"]["peak_planned_bytes"], "mebp": m["train_step"]["peak_planned_bytes"],
                   "mezo": m["eval_loss"]["peak_planned_bytes"]}.get(method)
        if method != "autograd":
            r["step_flops"] = (speed.schedule_flops(manifest, "train_step") if method != "mezo" else
                               _times(2, speed.schedule_flops(manifest, "eval_loss")))
        results[name] = {"peak_planned_bytes": planned, **r}
        say(f"  {name}: step {r['step_time_s']:.2f}s, peak measured {r['peak_measured_bytes'] / 1e6:.1f} MB"
            + (f", {r['step_flops'] / r['step_time_s'] / 1e9:.1f} GFLOP/s" if r["step_flops"] else ""))
    gemm.append(speed.gemm_throughput(*gemm_shape))
    gemm_flops = max(gemm)  # before and after the methods ran: the machine's best, on these shapes
    say(f"float32 GEMM after the methods: {gemm[1] / 1e9:.1f} GFLOP/s; the limit used: {gemm_flops / 1e9:.1f}")
    for r in results.values():
        r["gflop_per_s"] = r["step_flops"] / r["step_time_s"] / 1e9 if r["step_flops"] else None
        r["gemm_fraction"] = r["gflop_per_s"] * 1e9 / gemm_flops if r["gflop_per_s"] else None
    call_runs = {name: r["calls"] for name, r in results.items() if r["calls"]}
    if call_runs:
        speed.plot_call_times(call_runs, out / "time_per_call.png",
                              f"{Path(model).name}: time per call of one training step, {runtime}, "
                              f"sequence {seq_len}, {n_threads} thread(s)")
    exact = np.load(results["autograd"]["grads_file"]) if "autograd" in results else None
    for name, r in results.items():
        r["grad_cosine"] = None if exact is None or name == "autograd" else _cosine(np.load(r["grads_file"]), exact)
    say(f"measuring memory per call ({', '.join(bundles)})")
    timelines = {name: measure(path, schedule="train_step") for name, path in bundles.items()}
    plot_timeline({f"{m} ({runtime})": timelines[m] for m in timelines}, out / "memory_per_call.png",
                  f"{Path(model).name}: memory per call of one training step, sequence {seq_len}")
    plot_split({f"{m} ({runtime}, sequence {seq_len})": timelines[m] for m in timelines}, out / "memory_split.png",
               f"{Path(model).name}: planned memory per call, split")
    conv = convergence(runtime, out, convergence_steps, say) if convergence_steps else None
    report = {
        "settings": {"model": model, "runtime": runtime, "seq_len": seq_len, "batch": 1, "dtype": "float32",
                     "lora_rank": manifests[label("mesp", quants[0])]["lora"]["rank"],
                     "lora_targets": manifests[label("mesp", quants[0])]["lora"]["targets"],
                     "weights": manifests[label("mesp", quants[0])]["weights"]["source"], "steps": steps, "lr": lr,
                     "seed": seed, "machine": f"{os.cpu_count()} cores", "quant": list(quants),
                     "threads": n_threads, "gemm_shape": list(gemm_shape), "gemm_gflop_per_s": gemm_flops / 1e9,
                     "gemm_gflop_per_s_before_after": [g / 1e9 for g in gemm]},
        "methods": {m: {"peak_planned_bytes": r["peak_planned_bytes"], "peak_measured_bytes": r["peak_measured_bytes"],
                        "step_time_s": r["step_time_s"], "grad_cosine": r["grad_cosine"],
                        "step_gflop": r["step_flops"] / 1e9 if r["step_flops"] else None,
                        "gflop_per_s": r["gflop_per_s"], "gemm_fraction": r["gemm_fraction"]}
                    for m, r in results.items()},
        "time_per_call": {m: {"calls": r["calls"], "by_graph": speed.time_by_graph(r["calls"], manifests[bundle_of[m]])}
                          for m, r in results.items() if r["calls"]},
        "memory_per_call": {m: [{k: c.get(k) for k in ("graph", "layer", "weights_bytes", "arena_bytes", "store_bytes",
                                                      "paged_bytes", "planned_bytes", "measured_bytes")}
                                for c in t["calls"]] for m, t in timelines.items()},
        "convergence": conv,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown_table(report))
    say(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    rows = report["methods"]
    ref_a, ref_m = rows.get("autograd"), rows.get("mebp")

    def mb(v):
        return "n/a" if v is None else f"{v / 1e6:.1f}"

    def x(v):
        return "n/a" if v is None else f"{v:.2f}x"

    s = report["settings"]
    quants = s.get("quant", ["none"])
    lines = [f"{s['model']} ({s['weights']}), {s['runtime']}, float32 compute, frozen weights "
             f"{', '.join('float32' if q == 'none' else q for q in quants)}, sequence {s['seq_len']}, batch 1, "
             f"LoRA rank {s['lora_rank']} on {','.join(s['lora_targets'])}, {s['machine']}; median of {s['steps']} steps.",
             f"Threads: {s.get('threads', 'n/a')} for every runtime and PyTorch. Float32 GEMM limit "
             + (f"{s['gemm_gflop_per_s']:.1f} GFLOP/s ({'x'.join(map(str, s['gemm_shape']))}, best of the probes "
                f"before and after the methods ran: "
                f"{', '.join(f'{g:.1f}' for g in s['gemm_gflop_per_s_before_after'])})." if "gemm_gflop_per_s" in s
                else "not measured."),
             "",
             "| method | peak planned MB | peak measured MB | step s | grad cosine | planned / mebp | measured / mebp "
             "| measured / autograd | time / mebp | time / autograd | planned / float32 | time / float32 "
             "| step GFLOP | GFLOP/s | of GEMM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        method, _, quant = m.partition("-")
        ref_m = rows.get(label("mebp", quant or "none"))
        ref_f = rows.get(method) if quant else None
        cos = "exact (reference)" if m == "autograd" else ("n/a" if r["grad_cosine"] is None else f"{r['grad_cosine']:.6f}")
        lines.append(
            f"| {m} | {mb(r['peak_planned_bytes'])} | {mb(r['peak_measured_bytes'])} | {r['step_time_s']:.2f} | {cos} | "
            f"{x(_ratio(r['peak_planned_bytes'], ref_m and ref_m['peak_planned_bytes']))} | "
            f"{x(_ratio(r['peak_measured_bytes'], ref_m and ref_m['peak_measured_bytes']))} | "
            f"{x(_ratio(r['peak_measured_bytes'], ref_a and ref_a['peak_measured_bytes']))} | "
            f"{x(_ratio(r['step_time_s'], ref_m and ref_m['step_time_s']))} | "
            f"{x(_ratio(r['step_time_s'], ref_a and ref_a['step_time_s']))} | "
            f"{x(_ratio(r['peak_planned_bytes'], ref_f and ref_f['peak_planned_bytes']))} | "
            f"{x(_ratio(r['step_time_s'], ref_f and ref_f['step_time_s']))} | "
            f"{num(r.get('step_gflop'), '.4g')} | {num(r.get('gflop_per_s'), '.1f')} | "
            f"{num(r.get('gemm_fraction') and 100 * r['gemm_fraction'], '.0f', '%')} |")
    for m, t in report.get("time_per_call", {}).items():
        lines += ["", f"Where the time of one {m} step goes (its fastest timed step, "
                      f"{sum(c['seconds'] for c in t['calls']):.2f} s):", "",
                  "| graph | calls | s | share | GFLOP/s |", "|---|---|---|---|---|"]
        lines += [f"| {g['kind']} | {g['calls']} | {g['seconds']:.3f} | {100 * g['share']:.1f}% | "
                  f"{num(g['gflop_per_s'], '.1f')} |" for g in t["by_graph"]]
    return "\n".join(lines) + "\n"


def num(v, fmt: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{unit}"


if __name__ == "__main__":
    import runtime_harness  # noqa: F401

    m, b, n, lr_arg, seed_arg, grads_path = sys.argv[1:7]
    print(json.dumps(worker(m, Path(b), int(n), float(lr_arg), int(seed_arg), Path(grads_path))))
