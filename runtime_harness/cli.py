"""`python -m runtime_harness {verify,grads,train,memory,profile,bench}`: parse, call one function, print."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from exporter.cli import count, positive_float, positive_int
from exporter.outputs import file_target, removed_on_failure, run_dir

# coreml: the Core ML framework on macOS, the NumPy MIL interpreter elsewhere; mil: the interpreter anywhere
RUNTIMES = ("ort", "executorch", "coreml", "mil")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime_harness", description="Replay device bundles: verify, measure, train.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--threads", type=positive_int, metavar="N",
                        help="threads for every runtime and for PyTorch (the reference and the autograd baseline); "
                             "default: $ONDEVICE_LORA_THREADS, else the usable cores")

    v = sub.add_parser("verify", parents=[common], help="one step vs transformers + PEFT + autograd; exit 1 on a mismatch")
    v.add_argument("bundle", type=Path)
    v.add_argument("--runtime", choices=RUNTIMES, help="default: the bundle's backend")
    v.add_argument("--adapter", type=Path, help="PEFT adapter folder (default: a seeded nonzero LoRA)")
    v.add_argument("--seed", type=count, default=0, metavar="N",
                   help="seed of the batch and of the nonzero LoRA (default: %(default)s)")
    v.add_argument("--report", type=Path, help="where to write report.json (default: BUNDLE/../<bundle>-verify/"
                   "report.json); written before the verdict is printed")

    g = sub.add_parser("grads", parents=[common], help="loss and LoRA gradients of one step, PEFT-named, to a safetensors file")
    g.add_argument("bundle", type=Path)
    g.add_argument("--input-ids", type=Path, required=True, help=".npy of shape (batch, seq_len)")
    g.add_argument("--labels", type=Path, help=".npy like --input-ids (default: the input ids)")
    g.add_argument("--adapter", type=Path, help="PEFT adapter folder (default: the bundle's initial adapter)")
    g.add_argument("--runtime", choices=RUNTIMES, help="must be the bundle's backend (default: it)")
    g.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")

    from runtime_harness.data import FORMATS

    t = sub.add_parser("train", parents=[common], help="fine-tune through the exported graphs; loss curves + PEFT adapters")
    t.add_argument("bundle", type=Path)
    t.add_argument("--data", type=Path, help="plain text, or JSONL of chat messages, prompt/completion pairs or "
                                              "token ids (required unless --resume)")
    t.add_argument("--format", choices=FORMATS, help="default: detected from the content")
    t.add_argument("--steps", type=positive_int, required=True, metavar="N",
                   help="steps to run now (a resumed run continues its count)")
    t.add_argument("--lr", type=positive_float, help="learning rate, positive and finite (default: "
                   + ", ".join(f"{v:g} for {k}" for k, v in _default_lr().items()) + "; a resumed run's own)")
    t.add_argument("--adapter", type=Path, help="start from this PEFT adapter (default: the bundle's)")
    t.add_argument("--runtime", choices=RUNTIMES, help="must be the bundle's backend (default: it)")
    t.add_argument("--seed", type=count, metavar="N", help="data order and held-out split (default: 0)")
    t.add_argument("--eval-data", type=Path, help="evaluate on this file (same formats as --data)")
    t.add_argument("--eval-fraction", type=float, help="or hold out this fraction of --data for evaluation")
    t.add_argument("--eval-every", type=positive_int, metavar="N",
                   help="evaluate every N steps and at the end (default: steps / 10)")
    t.add_argument("--resume", type=Path, help="continue the run in RUN_DIR (adapter, optimizer state, step, "
                                                "data position, settings)")
    t.add_argument("--out", type=Path, help="run folder, never inside the bundle (default: the resumed run, else "
                   "runs/<bundle name>-train); an existing non-empty folder is refused unless --overwrite")
    t.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")

    m = sub.add_parser("memory", parents=[common], help="planned and measured memory per call of one step, with a timeline plot")
    m.add_argument("bundle", type=Path, nargs="+", help="one or more bundles (e.g. one per sequence length): "
                   "a panel each in memory_split.png")
    m.add_argument("--runtime", choices=RUNTIMES, help="must be the bundle's backend (default: it)")
    m.add_argument("--schedule", default="train_step", choices=("train_step", "eval_loss"),
                   help="which schedule to measure (default: %(default)s)")
    m.add_argument("--out", type=Path, help="default: runs/<bundle name>-memory")

    pr = sub.add_parser("profile", parents=[common], help="where an ONNX Runtime step's time goes (ORT's profiler)")
    pr.add_argument("bundle", type=Path)
    pr.add_argument("--schedule", default="train_step", choices=("train_step", "eval_loss"),
                    help="which schedule to profile (default: %(default)s)")
    pr.add_argument("--out", type=Path, help="default: runs/<bundle name>-profile")

    b = sub.add_parser("bench", parents=[common], help="MeSP vs MeBP vs autograd vs MeZO side by side: memory, time, gradients, plots")
    b.add_argument("--model", required=True, help="registry name or checkpoint folder")
    b.add_argument("--runtime", choices=("ort", "executorch"), default="executorch",
                   help="runtime of the bundles (default: %(default)s)")
    b.add_argument("--methods", default=",".join(_bench_methods()),
                   help="comma-separated subset of %(default)s (default: all)")
    b.add_argument("--seq-len", type=positive_int, default=256, metavar="N",
                   help="tokens per sequence, at least 2 (default: %(default)s)")
    b.add_argument("--weights", help="'random', a checkpoint folder or repo id (default: random for registry "
                                      "models, a checkpoint folder's own weights)")
    b.add_argument("--steps", type=positive_int, default=3, metavar="N",
                   help="timed steps per method, after one warm-up (default: %(default)s)")
    b.add_argument("--quant", default="none", metavar="LIST",
                   help="frozen-weight formats to compare, comma-separated subset of none,int8,int4: mesp and mebp "
                        "run once per format (default: %(default)s)")
    b.add_argument("--convergence-steps", type=count, default=150, metavar="N",
                   help="steps of the convergence run; 0 skips it (default: %(default)s)")
    b.add_argument("--out", type=Path, help="default: runs/bench-<model>-<runtime>; removed again if the run fails "
                   "and created it")
    b.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    return p


def _default_lr() -> dict:
    from runtime_harness.train import DEFAULT_LR

    return DEFAULT_LR


def _bench_methods() -> tuple:
    from runtime_harness.bench import METHODS

    return METHODS


def _read_adapter(folder: Path | None, bundle: Path, manifest: dict) -> dict[str, np.ndarray]:
    """A PEFT adapter folder, checked against the bundle: same rank, alpha and targets, the same tensors
    of the same shapes, finite values."""
    from safetensors import SafetensorError

    from exporter.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
    from runtime_harness import verify as V
    from runtime_harness.runner import BundleError

    folder = folder if folder is not None else bundle / "adapter"
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise BundleError(f"cannot read the adapter in {folder}: {name} is missing")
    try:
        config, tensors = read_adapter(folder)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read the adapter in {folder}: {getattr(e, 'strerror', None) or e}") from None
    except SafetensorError as e:
        raise BundleError(f"cannot read the adapter in {folder}: its safetensors file is damaged "
                          f"({str(e).strip().splitlines()[0]})") from None
    arrays = {k: v.float().numpy() for k, v in tensors.items()}
    V.check_adapter_config(manifest, config)
    V.check_adapter(manifest, arrays)
    return arrays


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
    adapter = _read_adapter(args.adapter, args.bundle, manifest) if args.adapter else None
    report_path = file_target(args.report or args.bundle.parent / f"{args.bundle.name}-verify" / "report.json",
                              "--report")
    report = V.verify(args.bundle, args.runtime, adapter, args.seed)
    text = V.format_report(report, limit=None if len(report["tensors"]) <= 40 else 20)
    if manifest["backend"] == "coreml":  # and the packages' structure (signatures, weights stored once)
        from runtime_harness.coreml_check import verify_coreml_offline

        structure = verify_coreml_offline(args.bundle, manifest)
        text += "\n" + "\n".join(structure["lines"])
        report["structure"] = structure
        report["ok"] = report["ok"] and structure["ok"]
    _write(report_path, json.dumps(report, indent=1, allow_nan=False), "--report")  # before the verdict
    print(text)
    print(f"report: {report_path}")
    return 0 if report["ok"] else 1


def _write(path: Path, text: str, flag: str) -> None:
    """Write a text file, or raise one line (a full disk, a folder that went away)."""
    from runtime_harness.runner import BundleError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise BundleError(f"cannot write {flag} {path}: {e.strerror or e}") from None


def run_grads(args) -> int:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from runtime_harness import verify as V
    from runtime_harness.runner import BundleError, BundleRunner, load_manifest

    manifest = load_manifest(args.bundle)
    ids = _load_npy(args.input_ids, "input ids")
    labels = _load_npy(args.labels, "labels") if args.labels else ids.copy()
    V.check_batch(manifest, ids, labels)
    adapter = _read_adapter(args.adapter, args.bundle, manifest)
    out = file_target(args.out)
    if args.bundle.resolve() in out.resolve().parents:
        raise BundleError(f"--out {args.out} is inside the bundle; grads never write into a bundle")
    runner = BundleRunner(args.bundle, args.runtime)
    loss, grads = V.bundle_gradients(runner, adapter, ids, labels)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in grads.items()}, str(out),
                  metadata={"loss": repr(loss), "bundle": str(args.bundle)})
    except (OSError, SafetensorError) as e:
        out.unlink(missing_ok=True)
        raise BundleError(f"cannot write --out {args.out}: {getattr(e, 'strerror', None) or e}") from None
    print(f"loss {loss:.6f}; {len(grads)} LoRA gradients -> {args.out} "
          f"(runtime: {runner.backend.runtime or runner.backend.name})")
    return 0


def run_train(args) -> int:
    from exporter.progress import mode_for
    from runtime_harness.runner import BundleError, load_manifest
    from runtime_harness.train import TrainConfig, default_run_dir, train

    if args.adapter and args.resume:
        raise BundleError("--resume continues the run's own adapter; --adapter cannot be combined with it")
    manifest = load_manifest(args.bundle, check_files=False)  # train's runner checks every file
    out = args.out or args.resume or default_run_dir(args.bundle)
    continuing = args.resume is not None and Path(out).resolve() == Path(args.resume).resolve()
    out = run_dir(out, args.bundle, args.overwrite or continuing)
    adapter = _read_adapter(args.adapter, args.bundle, manifest) if args.adapter else None
    config = TrainConfig(args.bundle, args.steps, args.data, out, args.lr, args.runtime, args.seed, args.format,
                         args.eval_data, args.eval_fraction, args.eval_every, args.resume)
    r = train(config, adapter, progress=mode_for(sys.stderr))
    losses = r["losses"]
    if r["interrupted"]:
        print(f"interrupted after {len(losses)} of {r['steps_asked']} steps; saved what was done: "
              f"{out / 'loss.csv'}, adapter (PEFT): {r['adapter']}; resume with --resume {out}", file=sys.stderr)
        return 130
    print(f"{r['format']} data, {r['examples']} training examples ({r['tokenizer']})"
          + (f", {r['eval_examples']} eval examples" if r["eval_examples"] else "")
          + (f"; {r['truncated']} example(s) truncated to the sequence length" if r["truncated"] else ""))
    print(f"steps {r['first_step']}..{r['first_step'] + len(losses) - 1}, lr {r['lr']:g}: loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}; median step {sorted(r['step_seconds'])[len(losses) // 2]:.3f}s"
          + (f"; best eval loss {r['best']['eval_loss']:.4f} at step {r['best']['step']}" if r["best"] else ""))
    print(f"loss curves: {out / 'loss.csv'}, {out / 'loss.png'}; adapter (PEFT): {r['adapter']}"
          + (f", best: {out / 'adapter-best'}" if r["best"] else "") + f"; resume with --resume {out}")
    print(f"runtime: {r['runtime']}")
    return 0


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def run_memory(args) -> int:
    from runtime_harness.memory import measure, plot_split, plot_timeline

    reports = [measure(bundle, args.runtime, args.schedule) for bundle in args.bundle]
    out = args.out or Path("runs") / f"{args.bundle[0].name}-memory"
    out.mkdir(parents=True, exist_ok=True)
    names = [b.name for b in args.bundle]
    (out / "memory.json").write_text(json.dumps(reports[0] if len(reports) == 1 else {"reports": reports}, indent=1))
    labels = {f"{n} (seq {r['seq_len']})": r for n, r in zip(names, reports)}
    plot_timeline(labels if len(reports) > 1 else {reports[0]["method"]: reports[0]}, out / "memory.png",
                  f"{names[0] if len(names) == 1 else 'bundles'}: memory per call ({args.schedule})")
    plot_split(labels, out / "memory_split.png", f"planned memory per call ({args.schedule})")
    for name, report in zip(names, reports):
        print(f"{name}:")
        print(f"{'call':>4} {'graph':<26} {'layer':>5} {'weights MB':>10} {'arena MB':>9} {'live MB':>8} "
              f"{'paged MB':>9} {'planned MB':>10} {'measured MB':>11}")
        for c in report["calls"]:
            print(f"{c['index']:>4} {c['graph']:<26} {'' if c['layer'] is None else c['layer']:>5} "
                  f"{_mb(c['weights_bytes']):>10} {_mb(c['arena_bytes']):>9} {_mb(c['store_bytes']):>8} "
                  f"{_mb(c.get('paged_bytes')):>9} {_mb(c['planned_bytes']):>10} {_mb(c['measured_bytes']):>11}")
        print(f"peak planned {_mb(report['peak_planned_bytes'])} MB ({report['peak_planned_call']}); "
              f"peak measured {_mb(report['peak_measured_bytes'])} MB; step {report['step_seconds']:.2f}s")
        print(f"runtime: {report['runtime']}")
    print(f"timeline: {out / 'memory.png'}; split: {out / 'memory_split.png'}; figures: {out / 'memory.json'}")
    return 0


def run_profile(args) -> int:
    from runtime_harness.profile import format_summary, profile

    out = run_dir(args.out or Path("runs") / f"{args.bundle.name}-profile", args.bundle, overwrite=True)
    with removed_on_failure(out):  # (writes profile.json, profile.png and trace-*.json; replaces only those)
        summary = profile(args.bundle, out, args.schedule)
    print(format_summary(summary))
    print(f"summary: {out / 'profile.json'}, {out / 'profile.png'}; ORT traces (chrome://tracing): {out}/trace-*.json")
    return 0


def run_bench(args) -> int:
    from exporter.build import BuildError
    from runtime_harness.bench import bench
    from runtime_harness.runner import BundleError

    from exporter.registry import MODELS
    from graphs.config import LoraConfig
    from runtime_harness.bench import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BundleError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {','.join(METHODS)}")
    try:
        LoraConfig(seq_len=args.seq_len)
    except ValueError as e:
        raise BundleError(f"--seq-len: {e}") from None
    from graphs.quant import SCHEMES

    quants = tuple(q.strip() for q in args.quant.split(",") if q.strip())
    bad = [q for q in quants if q not in SCHEMES]
    if bad or not quants or len(set(quants)) != len(quants):
        raise BundleError(f"--quant: {', '.join(bad) or 'a format given twice, or none'}; "
                          f"choose a comma-separated subset of {','.join(SCHEMES)}")
    out = run_dir(args.out or Path("runs") / f"bench-{Path(args.model).name}-{args.runtime}", None, args.overwrite)
    weights = args.weights or ("random" if args.model in MODELS else None)
    try:
        with removed_on_failure(out):
            bench(args.model, args.runtime, methods, args.seq_len, out, args.steps, weights,
                  convergence_steps=args.convergence_steps, say=lambda s: print(s, flush=True), quants=quants)
    except BuildError as e:
        raise BundleError(str(e)) from None
    plots = [out / f for f in ("memory_per_call.png", "memory_split.png", "time_per_call.png", "convergence.png")
             if (out / f).exists()]
    print(f"results: {', '.join(map(str, [out / 'bench.json', out / 'bench.md', *plots]))}")
    return 0


COMMANDS = {"verify": run_verify, "grads": run_grads, "train": run_train, "memory": run_memory,
            "profile": run_profile, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    import runtime_harness  # noqa: F401  (quiets third-party import logs)
    from exporter.backends.base import RuntimeUnavailable
    from exporter.outputs import Interrupted, OutputError, signals_interrupt
    from runtime_harness.runner import BundleError

    args = parser().parse_args(argv)
    try:
        if args.threads is not None:
            from exporter.threads import set_threads

            set_threads(args.threads)
        with signals_interrupt():
            return COMMANDS[args.command](args)
    except (BundleError, RuntimeUnavailable, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        name = e.name if isinstance(e, Interrupted) else "SIGINT"
        print(f"interrupted ({name}); {'nothing was saved' if args.command == 'train' else 'no result was written'}",
              file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Interrupted) else 2)
