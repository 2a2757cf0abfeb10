"""`python -m runtime_harness {verify,grads,train,memory,bench}`: parse, call one function, print."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RUNTIMES = ("ort", "executorch", "coreml")


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
    from runtime_harness.coreml_check import verify_coreml_offline, coreml_runs_here
    from runtime_harness.runner import load_manifest

    manifest = load_manifest(args.bundle)
    adapter = _read_adapter(args.adapter, args.bundle) if args.adapter else None
    report_path = args.report or args.bundle.parent / f"{args.bundle.name}-verify" / "report.json"
    if manifest["backend"] == "coreml" and not coreml_runs_here():
        report = verify_coreml_offline(args.bundle, manifest)
        print("\n".join(report["lines"]))
    else:
        report = V.verify(args.bundle, args.runtime, adapter, args.seed)
        print(V.format_report(report, limit=None if len(report["tensors"]) <= 40 else 20))
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
    loss, grads = V.bundle_gradients(BundleRunner(args.bundle, args.runtime), adapter, ids, labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in grads.items()}, str(args.out),
              metadata={"loss": repr(loss), "bundle": str(args.bundle)})
    print(f"loss {loss:.6f}; {len(grads)} LoRA gradients -> {args.out}")
    return 0


COMMANDS = {"verify": run_verify, "grads": run_grads}


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
