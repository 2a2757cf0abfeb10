"""Where an ONNX Runtime step's time goes, from ORT's own profiler.

Every session of the bundle is created with `enable_profiling` (`OrtBackend(profile_prefix=...)`); one
warm-up step, then one profiled step. Of ORT's trace (one chrome://tracing JSON per session, kept in the
output folder) only the events of the profiled step count:

  kernel time   `Node` events `<node>_kernel_time`: the time each operator's CPU kernel ran, summed per
                operator type (MatMul, Gemm, Softmax, ...) and per graph kind;
  run time      `Session` events `model_run`: each `InferenceSession.run`, so run - kernels is ORT's own
                per-run overhead (input binding, allocation, the executor);
  step time     the profiled step's wall time, so step - runs is the app side (reading weights, the
                store, the schedule).

Matrix-product FLOPs (the manifest's per-graph `flops`) over the MatMul / Gemm / FusedMatMul kernel time
give what ORT's MLAS GEMMs achieve inside the step.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from runtime_harness.runner import BundleError, BundleRunner, load_manifest
from runtime_harness.speed import schedule_flops

MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits")


def profile(bundle: Path, out: Path, schedule: str = "train_step", seed: int = 0) -> dict:
    """Run one warm-up and one profiled step of `schedule`; returns the summary (also written to out)."""
    from exporter.backends.ort import OrtBackend
    from exporter.threads import threads
    from runtime_harness.verify import nonzero_adapter, seeded_batch

    manifest = load_manifest(bundle)
    if manifest["backend"] != "ort":
        raise BundleError(f"{bundle} is a {manifest['backend']} bundle; profile reads ONNX Runtime's profiler "
                          f"(for every runtime, bench reports the time of each call)")
    out.mkdir(parents=True, exist_ok=True)
    backend = OrtBackend(profile_prefix=out / "ort")
    runner = BundleRunner(bundle, check_files=False, backend_instance=backend)
    runner.load_all()
    store = runner.initial_state(nonzero_adapter(manifest, seed))
    ids, labels = seeded_batch(manifest, seed)
    runner.step(store, ids, labels, 0.0, schedule=schedule)  # warm-up: first-run allocations stay out
    start_ns = time.time_ns()  # ORT stamps a profile's start with the system clock
    _, trace = runner.step(store, ids, labels, 0.0, schedule=schedule)
    step_seconds = (time.time_ns() - start_ns) / 1e9
    traces = []
    for graph_file, trace_file, profile_start in backend.end_profiling():
        kept = out / f"trace-{graph_file}.json"
        shutil.move(trace_file, kept)
        traces.append((graph_file, kept, profile_start))
    summary = summarize(traces, start_ns, manifest, schedule)
    summary.update({"bundle": str(bundle), "schedule": schedule, "threads": threads(),
                    "step_seconds": step_seconds, "calls_seconds": trace.seconds,
                    "traces": [str(p) for _, p, _ in traces]})
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "profile.png", f"{Path(bundle).name}: ONNX Runtime kernel time of one {schedule} step")
    return summary


def summarize(traces: list[tuple[str, Path, int]], start_ns: int, manifest: dict, schedule: str) -> dict:
    """Kernel seconds per operator type and per graph, run seconds, of the events after `start_ns`."""
    kind_of = {Path(g["file"]).name: g["kind"] for g in manifest["graphs"].values()}
    by_op: dict[str, dict] = {}
    by_graph: dict[str, float] = {}
    runs = kernels = 0.0
    for graph_file, path, profile_start in traces:
        kind = kind_of.get(graph_file, graph_file)
        for e in json.loads(Path(path).read_text()):
            if profile_start + int(e.get("ts", 0)) * 1000 < start_ns:
                continue  # the warm-up step
            seconds = e.get("dur", 0) / 1e6
            if e.get("cat") == "Session" and e.get("name") == "model_run":
                runs += seconds
            elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                row = by_op.setdefault(op, {"op": op, "seconds": 0.0, "count": 0})
                row["seconds"] += seconds
                row["count"] += 1
                by_graph[kind] = by_graph.get(kind, 0.0) + seconds
                kernels += seconds
    flops = schedule_flops(manifest, schedule) or 0
    matmul = sum(r["seconds"] for r in by_op.values() if r["op"] in MATMUL_OPS)
    for row in by_op.values():
        row["share"] = row["seconds"] / kernels if kernels else 0.0
    return {"kernel_seconds": kernels, "run_seconds": runs, "matmul_seconds": matmul,
            "matmul_share": matmul / kernels if kernels else 0.0, "step_flops": flops,
            "matmul_gflop_per_s": flops / matmul / 1e9 if matmul else None,
            "by_op": sorted(by_op.values(), key=lambda r: -r["seconds"]),
            "by_graph": [{"graph": k, "seconds": v} for k, v in sorted(by_graph.items(), key=lambda kv: -kv[1])]}


def format_summary(s: dict, top: int = 12) -> str:
    lines = [f"one {s['schedule']} step, {s['threads']} thread(s): {s['step_seconds']:.3f} s wall; ORT runs "
             f"{s['run_seconds']:.3f} s; kernels {s['kernel_seconds']:.3f} s "
             f"(ORT's own per-run overhead {s['run_seconds'] - s['kernel_seconds']:.3f} s, the app side "
             f"{s['step_seconds'] - s['run_seconds']:.3f} s)",
             f"matrix products ({', '.join(MATMUL_OPS)}): {s['matmul_seconds']:.3f} s, "
             f"{100 * s['matmul_share']:.1f}% of kernel time"
             + (f", {s['matmul_gflop_per_s']:.1f} GFLOP/s on the step's {s['step_flops'] / 1e9:.1f} GFLOP"
                if s["matmul_gflop_per_s"] else ""),
             f"{'operator':<28} {'calls':>6} {'s':>8} {'share':>7}"]
    lines += [f"{r['op']:<28} {r['count']:>6} {r['seconds']:>8.3f} {100 * r['share']:>6.1f}%" for r in s["by_op"][:top]]
    lines.append("per graph: " + ", ".join(f"{g['graph']} {g['seconds']:.3f} s" for g in s["by_graph"]))
    return "\n".join(lines)


def plot(s: dict, path: Path, title: str, top: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["by_op"][:top][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh([r["op"] for r in rows], [r["seconds"] for r in rows],
            color=["C3" if r["op"] in MATMUL_OPS else "C0" for r in rows])
    ax.set_xlabel("kernel seconds in one step (red: matrix products)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
