"""Structure checks of a Core ML bundle, run by `verify` next to the replayed step: checksums, the manifest
(schema and schedule data flow, checked on load), and per package: every function the manifest names
exists with exactly its input and output names, shapes and dtypes, and a layer's frozen weights are
stored once for its forward and backward functions."""
from __future__ import annotations

from pathlib import Path

from runtime_harness.runner import check_bundle_files

SHARED_WEIGHTS_SLACK = 1.15  # weight.bin may hold a little more than the layer's constants (alignment)


def verify_coreml_offline(bundle: Path, manifest: dict) -> dict:
    from exporter.backends.coreml import describe_package

    check_bundle_files(bundle, manifest)
    lines = ["structure: file checksums, manifest schema and schedule data flow, and per package:"]
    problems = []
    by_file: dict[str, list[tuple[str, dict]]] = {}
    for gid, g in manifest["graphs"].items():
        by_file.setdefault(g["file"], []).append((gid, g))
    for rel, graphs in sorted(by_file.items()):
        described = describe_package(bundle / rel)
        for gid, g in graphs:
            fn = described["functions"].get(g["method"])
            if fn is None:
                problems.append(f"{rel} has no function {g['method']}")
                continue
            if fn["inputs"] != g["inputs"]:
                problems.append(f"{rel}::{g['method']} inputs differ from the manifest")
            if [o["name"] for o in fn["outputs"]] != [o["name"] for o in g["outputs"]]:
                problems.append(f"{rel}::{g['method']} outputs differ from the manifest")
        constants = max(g.get("constant_bytes", 0) for _, g in graphs)
        shared = ""
        if constants:
            ratio = described["weight_bin_bytes"] / constants
            shared = f", weights {described['weight_bin_bytes']:,} B for {constants:,} B of constants ({ratio:.3f}x)"
            if not 1.0 <= ratio <= SHARED_WEIGHTS_SLACK:
                problems.append(f"{rel}: weights are not stored once ({ratio:.2f}x the layer's constants)")
        lines.append(f"  {rel}: functions {', '.join(g['method'] for _, g in graphs)} match the manifest{shared}")
    lines.append("FAIL: " + "; ".join(problems) if problems else
                 f"PASS (structure): {len(by_file)} packages, {len(manifest['graphs'])} functions")
    return {"bundle": str(bundle), "runtime": "coreml", "ok": not problems, "replayed": False,
            "problems": problems, "lines": lines}
