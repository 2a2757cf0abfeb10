"""`python -m runtime_harness {verify,grads,train,memory,bench}`: parse, call one function, print."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# coreml: the Core ML framework on macOS, the NumPy MIL interpreter elsewhere; mil: the interpreter anywhere
RUNTIMES = ("ort", "executorch", "coreml", "mil")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime_harness", description="Replay device bundles: verify, measure, train.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    v = sub.add_parser("verify", help="one step vs transformers + PEFT + autograd; exit 1 on a mismatch")
    v.add_argument("bundle", type=Path)
    v.add_argument("--runtime", choices=RUNTIMES, help="default: the bundle's backend")
    v.add_argument("--adapter", type=Path, help="PEFT adapter folder (default: a seeded nonzero LoRA)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--report", type=Path, help="where to write report.json (default: BUNDLE/../<bundle>-verify/)")

    g = sub.add_parser("grads", help="loss and LoRA gradients of one step, PEFT-named, to a safetensors file")
    g.add_argument("bundle", type=Path)
    g.add_argument("--input-ids", type=Path, required=True, help=".npy of shape (batch, seq_len)")
    g.add_argument("--labels", type=Path, help=".npy like --input-ids (default: the input ids)")
    g.add_argument("--adapter", type=Path, help="PEFT adapter folder (default: the bundle's initial adapter)")
    g.add_argument("--runtime", choices=RUNTIMES)
    g.add_argument("--out", type=Path, required=True)

    t = sub.add_parser("train", help="fine-tune through the exported graphs; loss curve + PEFT adapter")
    t.add_argument("bundle", type=Path)
    t.add_argument("--data", type=Path, required=True, help="a UTF-8 text file")
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--lr", type=float, help="learning rate (default: 1e-2 for sgd, 1e-3 for adamw)")
    t.add_argument("--adapter", type=Path, help="start from this PEFT adapter (default: the bundle's)")
    t.add_argument("--runtime", choices=RUNTIMES)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, help="default: runs/<bundle name>-train")

    m = sub.add_parser("memory", help="planned and measured memory per call of one step, with a timeline plot")
    m.add_argument("bundle", type=Path)
    m.add_argument("--runtime", choices=RUNTIMES)
    m.add_argument("--schedule", default="train_step", choices=("train_step", "eval_loss"))
    m.add_argument("--out", type=Path, help="default: runs/<bundle name>-memory")

    b = sub.add_parser("bench", help="MeSP vs MeBP vs autograd vs MeZO side by side: memory, time, gradients, plots")
    b.add_argument("--model", required=True, help="registry name or checkpoint folder")
    b.add_argument("--runtime", choices=("ort", "executorch"), default="executorch")
    b.add_argument("--methods", default="mesp,mebp,autograd,mezo")
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--weights", help="'random', a checkpoint folder or repo id (default: random for registry "
                                      "models, a checkpoint folder's own weights)")
    b.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up)")
    b.add_argument("--convergence-steps", type=int, default=150, help="0 skips the convergence run")
    b.add_argument("--out", type=Path, help="default: runs/bench-<model>-<runtime>")
    return p


def _read_adapter(folder: Path | None, bundle: Path) -> dict[str, np.ndarray]:
    from exporter.adapter import read_adapter
    from runtime_harness.runner import BundleError

    folder = folder if folder is not None else bundle / "adapter"
    try:
        _, tensors = read_adapter(folder)
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"cannot read the adapter in {folder}: {e.__class__.__name__}: {str(e)[:120]}") from None
    return {k: v.numpy() for k, v in tensors.items()}


def _load_npy(path: Path, what: str) -> np.ndarray:
    from runtime_harness.runner import BundleError

    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {what} from {path}: {e}") from None
    if arr.dtype.kind not in "iu":
        raise BundleError(f"{what} in {path} must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


def run_verify(args) -> int:
    from runtime_harness import verify as V
    from runtime_harness.runner import load_manifest

    manifest = load_manifest(args.bundle)
    adapter = _read_adapter(args.adapter, args.bundle) if args.adapter else None
    report_path = args.report or args.bundle.parent / f"{args.bundle.name}-verify" / "report.json"
    report = V.verify(args.bundle, args.runtime, adapter, args.seed)
    print(V.format_report(report, limit=None if len(report["tensors"]) <= 40 else 20))
    if manifest["backend"] == "coreml":  # and the packages' structure (signatures, weights stored once)
        from runtime_harness.coreml_check import verify_coreml_offline

        structure = verify_coreml_offline(args.bundle, manifest)
        print("\n".join(structure["lines"]))
        report["structure"] = structure
        report["ok"] = report["ok"] and structure["ok"]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    print(f"report: {report_path}")
    return 0 if report["ok"] else 1


def run_grads(args) -> int:
    from safetensors.numpy import save_file

    from runtime_harness import verify as V
    from runtime_harness.runner import BundleRunner, load_manifest

    manifest = load_manifest(args.bundle)
    V.check_files(args.bundle, manifest)
    ids = _load_npy(args.input_ids, "input ids")
    labels = _load_npy(args.labels, "labels") if args.labels else ids.copy()
    V.check_batch(manifest, ids, labels)
    adapter = _read_adapter(args.adapter, args.bundle)
    V.check_adapter(manifest, adapter)
    runner = BundleRunner(args.bundle, args.runtime)
    loss, grads = V.bundle_gradients(runner, adapter, ids, labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in grads.items()}, str(args.out),
              metadata={"loss": repr(loss), "bundle": str(args.bundle)})
    print(f"loss {loss:.6f}; {len(grads)} LoRA gradients -> {args.out} (runtime: {runner.backend.runtime or runner.backend.name})")
    return 0


def run_train(args) -> int:
    from runtime_harness.train import train

    try:
        text = args.data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        from runtime_harness.runner import BundleError
        raise BundleError(f"cannot read text from {args.data}: {e}") from None
    adapter = _read_adapter(args.adapter, args.bundle) if args.adapter else None
    out = args.out or Path("runs") / f"{args.bundle.name}-train"
    result = train(args.bundle, text, args.steps, out, args.lr, args.runtime, adapter, args.seed,
                   progress=sys.stderr.isatty())
    losses = result["losses"]
    print(f"{len(losses)} steps over {result['windows']} windows, lr {result['lr']:g}: loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}; median step {sorted(result['step_seconds'])[len(losses) // 2]:.3f}s")
    print(f"loss curve: {out / 'loss.csv'}, {out / 'loss.png'}; adapter (PEFT): {result['adapter']}")
    print(f"runtime: {result['runtime']}")
    return 0


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def run_memory(args) -> int:
    from runtime_harness.memory import measure, plot_timeline

    report = measure(args.bundle, args.runtime, args.schedule)
    out = args.out or Path("runs") / f"{args.bundle.name}-memory"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=1))
    plot_timeline({report["method"]: report}, out / "memory.png",
                  f"{args.bundle.name}: memory per call ({args.schedule})")
    print(f"{'call':>4} {'graph':<26} {'layer':>5} {'weights MB':>10} {'arena MB':>9} {'live MB':>8} "
          f"{'planned MB':>10} {'measured MB':>11}")
    for c in report["calls"]:
        print(f"{c['index']:>4} {c['graph']:<26} {'' if c['layer'] is None else c['layer']:>5} "
              f"{_mb(c['weights_bytes']):>10} {_mb(c['arena_bytes']):>9} {_mb(c['store_bytes']):>8} "
              f"{_mb(c['planned_bytes']):>10} {_mb(c['measured_bytes']):>11}")
    print(f"peak planned {_mb(report['peak_planned_bytes'])} MB ({report['peak_planned_call']}); "
          f"peak measured {_mb(report['peak_measured_bytes'])} MB; step {report['step_seconds']:.2f}s")
    print(f"timeline: {out / 'memory.png'}; figures: {out / 'memory.json'}")
    print(f"runtime: {report['runtime']}")
    return 0


def run_bench(args) -> int:
    from exporter.build import BuildError
    from runtime_harness.bench import bench
    from runtime_harness.runner import BundleError

    from exporter.registry import MODELS

    out = args.out or Path("runs") / f"bench-{Path(args.model).name}-{args.runtime}"
    weights = args.weights or ("random" if args.model in MODELS else None)
    try:
        bench(args.model, args.runtime, [m.strip() for m in args.methods.split(",") if m.strip()], args.seq_len, out,
              args.steps, weights, convergence_steps=args.convergence_steps,
              say=lambda s: print(s, flush=True))
    except BuildError as e:
        raise BundleError(str(e)) from None
    print(f"results: {out / 'bench.json'}, {out / 'bench.md'}, {out / 'memory_per_call.png'}"
          + (f", {out / 'convergence.png'}" if args.convergence_steps else ""))
    return 0


COMMANDS = {"verify": run_verify, "grads": run_grads, "train": run_train, "memory": run_memory, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    import runtime_harness  # noqa: F401  (quiets third-party import logs)
    from exporter.backends.base import RuntimeUnavailable
    from runtime_harness.runner import BundleError

    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (BundleError, RuntimeUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
