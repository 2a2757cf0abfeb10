"""`python -m exporter {list-models,build,inspect}`: parse, build the config, call one function, print."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graphs.config import ALL_TARGETS, MLP_BLOCK_BYTES, MLP_BLOCK_TOKENS, MLP_BLOCKS, LoraConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def _number(kind: type, low: float, strict: bool, what: str):
    """An argparse type: `kind` values (finite) above `low` (or at least `low` when not strict)."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, True, "a positive integer")
count = _number(int, 0, False, "a non-negative integer")
positive_float = _number(float, 0.0, True, "a positive finite number")


def _defaults() -> dict:
    """The defaults of the build flags, read from the one config dataclass (BuildConfig / LoraConfig)."""
    from exporter.config import BuildConfig

    b, lora = BuildConfig(), LoraConfig()
    return {"seq_len": lora.seq_len, "rank": lora.rank, "alpha": lora.alpha, "targets": ",".join(lora.targets),
            "optimizer": b.optimizer, "method": b.method, "vocab_chunk_rows": b.vocab_chunk_rows,
            "mlp_blocks": b.mlp_blocks, "seed": b.seed, "quant": b.quant}


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def parser() -> argparse.ArgumentParser:
    from exporter.backends import BACKEND_NAMES
    from exporter.graph_defs import METHODS, OPTIMIZERS
    from exporter.config import DEFAULT_DELEGATE, DELEGATES
    from graphs.quant import DEFAULT_GROUP_SIZE, SCHEMES

    p = _Parser(prog="python -m exporter", description="Export LLMs into on-device LoRA training bundles.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list-models", help="the registry: layers, hidden size, parameters, LoRA parameters")

    d = _defaults()
    b = sub.add_parser("build", help="write a device bundle")
    b.add_argument("--model", required=True, help="registry name, checkpoint folder, or Hugging Face repo id")
    b.add_argument("--backend", required=True, choices=BACKEND_NAMES, help="the runtime the bundle is for")
    b.add_argument("--out", type=Path, help="bundle folder (default: bundles/<model>-<backend>); an existing "
                   "bundle there is replaced when the new one is complete, any other non-empty folder is refused")
    b.add_argument("--weights", help="HF repo id, checkpoint folder, or 'random' (default: the model's own)")
    b.add_argument("--seq-len", type=positive_int, metavar="N",
                   help=f"tokens per training sequence, at least 2 (default: {d['seq_len']})")
    b.add_argument("--lora-rank", type=positive_int, metavar="R", help=f"LoRA rank (default: {d['rank']})")
    b.add_argument("--lora-alpha", type=positive_float, metavar="A",
                   help=f"LoRA alpha; the scale is alpha / rank (default: {d['alpha']:g})")
    b.add_argument("--lora-targets", metavar="LIST",
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: {d['targets']})")
    b.add_argument("--optimizer", choices=OPTIMIZERS, help=f"update in the bundle (default: {d['optimizer']})")
    b.add_argument("--method", choices=METHODS,
                   help=f"mesp: hand-derived backward; mebp: autodiff baseline (default: {d['method']})")
    b.add_argument("--vocab-chunk-rows", type=positive_int, metavar="N",
                   help=f"embedding / LM-head rows per call, balanced over the vocabulary (default: {d['vocab_chunk_rows']})")
    b.add_argument("--mlp-blocks", type=positive_int, metavar="N",
                   help=f"MLP channel blocks of the structured layers: calls of their own in a mesp bundle with "
                        f"weights as inputs, rounded up to equal blocks (default: {MLP_BLOCKS} per "
                        f"{MLP_BLOCK_TOKENS} tokens, and one per {MLP_BLOCK_BYTES // 2**20} MiB of float32 MLP weights)")
    b.add_argument("--seed", type=count, metavar="N",
                   help=f"seed of random weights and of the initial adapter (default: {d['seed']})")
    b.add_argument("--quant", choices=SCHEMES,
                   help=f"frozen weights: none (float32, exact against the checkpoint), int8 or int4 "
                        f"(asymmetric codes, dequantized as (q - z) * s inside the graphs) (default: {d['quant']})")
    b.add_argument("--quant-group-size", type=count, metavar="N",
                   help=f"input columns per scale and zero point; 0: one group per row (default: "
                        f"{', '.join(f'{k} {v}' for k, v in DEFAULT_GROUP_SIZE.items())})")
    b.add_argument("--delegate", choices=sorted({n for names in DELEGATES.values() for n in names}),
                   help=f"executorch only: xnnpack (matrix products on XNNPACK: faster, slower to build) or none "
                        f"(every op on the portable CPU kernels) (default: {DEFAULT_DELEGATE['executorch']}); "
                        f"refused with another backend")
    b.add_argument("--no-cache", action="store_true", help="re-trace and re-lower everything")
    b.add_argument("--quiet", action="store_true", help="no progress (default: a bar on a terminal, a line "
                   "every few seconds in logs)")
    b.add_argument("--verbose", action="store_true", help="per-program timings")

    i = sub.add_parser("inspect", help="print a bundle's manifest as a readable summary")
    i.add_argument("bundle", type=Path)
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    return p


def build_config(args: argparse.Namespace):
    """A BuildConfig from the parsed flags; unset flags keep the dataclass defaults."""
    from exporter.config import BuildConfig

    lora_kw = {k: v for k, v in (("rank", args.lora_rank), ("alpha", args.lora_alpha), ("seq_len", args.seq_len))
               if v is not None}
    if args.lora_targets is not None:
        lora_kw["targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    kw = {k: getattr(args, k) for k in ("model", "backend", "out", "weights", "optimizer", "method",
                                         "vocab_chunk_rows", "mlp_blocks", "seed", "quant", "quant_group_size",
                                         "delegate")
          if getattr(args, k) is not None}
    return BuildConfig(lora=LoraConfig(**lora_kw), **kw)


def list_models() -> int:
    from exporter.registry import MODELS

    lora = LoraConfig()
    print(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}, targets {','.join(lora.targets)}")
    print(f"{'model':<14} {'hf repo':<24} {'layers':>6} {'hidden':>6} {'parameters':>15} {'LoRA params':>12}")
    for name, spec in MODELS.items():
        print(f"{name:<14} {spec.hf_repo:<24} {spec.num_layers:>6} {spec.hidden_size:>6} "
              f"{spec.num_parameters():>15,} {lora.trainable_parameters(spec):>12,}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from exporter.build import BuildError, Reporter, build
    from exporter.cache import ArtifactCache
    from exporter.progress import mode_for

    try:
        config = build_config(args)
    except ValueError as e:
        raise BuildError(str(e)) from None
    cache = ArtifactCache.disabled() if args.no_cache else None
    manifest = build(config, Reporter(progress=mode_for(sys.stderr, args.quiet and not args.verbose),
                                      verbose=args.verbose), cache)
    print(summary(manifest, Path(manifest["bundle_dir"])))
    return 0


def summary(m: dict, bundle: Path) -> str:
    """Files, sizes and planned memory per call of a manifest."""
    lines = [f"bundle {bundle}: {m['model']['name']} / {m['backend']}"
             f"{'' if m.get('delegate') is None else ' (' + m['delegate'] + ')'} / {m['method']} / {m['optimizer']['name']}, "
             f"seq {m['seq_len']}, batch {m['batch']}, LoRA rank {m['lora']['rank']} on {','.join(m['lora']['targets'])} "
             f"({m['lora']['trainable_parameters']:,} trainable)"]
    fmt = m["weights"].get("format")
    lines[0] += ", frozen weights " + ("float32" if fmt is None else
                                       f"{fmt['scheme']} (group size {fmt['group_size'] or 'one per row'})")
    if "build_seconds" in m:
        lines[0] += f", built in {m['build_seconds']:.1f}s"
    files = m["files"]
    groups: dict[str, list[int]] = {}
    for rel, info in files.items():
        top = rel.split("/")[0]
        key = top if "/" in rel else rel
        if rel.startswith("graphs/") and ".mlpackage/" not in rel:
            key = rel
        elif ".mlpackage/" in rel:
            key = rel.split(".mlpackage/")[0] + ".mlpackage"
        groups.setdefault(key, []).append(info["bytes"])
    lines.append(f"files ({len(files)}, {_human(sum(i['bytes'] for i in files.values()))}):")
    for key in sorted(groups):
        lines.append(f"  {key:<44} {_human(sum(groups[key])):>10}" + (f"  ({len(groups[key])} files)" if len(groups[key]) > 1 else ""))
    train = m["schedules"]["train_step"]
    lines.append("planned memory per call of one training step (weights + runtime arena + live tensors):")
    lines.append(f"  {'graph':<28} {'calls':>5} {'weights':>10} {'arena':>10} {'live':>10} {'max planned':>12}")
    per_graph: dict[str, list[dict]] = {}
    for e in train:
        if e["op"] == "call":
            g = m["graphs"][e["graph"]]
            key = e["graph"] if g["layer"] is None else f"layer_XX.{g['kind']}"  # baked per-layer programs
            per_graph.setdefault(key, []).append(e["memory"])
    for g, mems in per_graph.items():
        top = max(mems, key=lambda x: x["planned_bytes"])
        lines.append(f"  {g:<28} {len(mems):>5} {_human(top['weights_bytes']):>10} {_human(top['arena_bytes']):>10} "
                     f"{_human(top['store_bytes']):>10} {_human(top['planned_bytes']):>12}")
    peak = m["memory"]["train_step"]
    lines.append(f"peak planned step memory: {_human(peak['peak_planned_bytes'])} at call {peak['peak_call_index']} "
                 f"({peak['peak_call_graph']})")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from exporter import integrity
    from exporter.build import BuildError
    from exporter.manifest import ManifestError, validate

    bundle = args.bundle if args.bundle.is_dir() else args.bundle.parent
    path = bundle / integrity.MANIFEST
    try:
        manifest = json.loads(integrity.read_manifest_bytes(bundle))
    except FileNotFoundError:
        raise BuildError(f"{args.bundle} is not a bundle (no {path.name})") from None
    except integrity.IntegrityError as e:
        raise BuildError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"{args.bundle} is not a bundle: cannot read {path.name} "
                         f"({getattr(e, 'strerror', None) or e})") from None
    try:
        validate(manifest)
        integrity.check_files(bundle, manifest)
    except integrity.IntegrityError as e:
        raise BuildError(str(e)) from None
    except ManifestError as e:
        raise BuildError(f"{args.bundle}: {e}") from None
    if args.json:
        print(json.dumps(manifest, indent=1))
        return 0
    print(summary(manifest, args.bundle))
    arch = manifest["model"]["architecture"]
    print(f"architecture: {arch['num_layers']} layers, hidden {arch['hidden_size']}, intermediate "
          f"{arch['intermediate_size']}, heads {arch['num_heads']}/{arch['num_kv_heads']} kv, vocab {arch['vocab_size']}")
    print(f"weights: {manifest['weights']['source']}; vocabulary chunks: {manifest['vocab_chunk']['count']} x "
          f"{manifest['vocab_chunk']['rows']} rows")
    print("graphs:")
    for gid, g in manifest["graphs"].items():
        ins = ", ".join(t["name"] for t in g["inputs"][:6]) + (", ..." if len(g["inputs"]) > 6 else "")
        print(f"  {gid:<28} {g['file']}{'::' + g['method'] if g['method'] else ''}  ({len(g['inputs'])} in: {ins}; "
              f"{len(g['outputs'])} out)")
    for name, entries in manifest["schedules"].items():
        calls = sum(e["op"] == "call" for e in entries)
        print(f"schedule {name}: {len(entries)} entries, {calls} calls")
    return 0


def main(argv: list[str] | None = None) -> int:
    import exporter  # noqa: F401  (quiets third-party import logs)
    from exporter.build import BuildError
    from exporter.outputs import Interrupted, OutputError

    args = parser().parse_args(argv)
    try:
        if args.command == "list-models":
            return list_models()
        if args.command == "build":
            return run_build(args)
        return run_inspect(args)
    except (BuildError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else 2
        name = e.name if isinstance(e, Interrupted) else "SIGINT"
        print(f"interrupted ({name}); nothing was written", file=sys.stderr)
        return 128 + signum
