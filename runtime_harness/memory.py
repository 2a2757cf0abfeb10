"""Step memory: planned (from the manifest) and measured (peak RSS of a fresh subprocess), per call.

planned bytes of a call = frozen weights it reads + the runtime's planned activation arena for its
graph (ExecuTorch; Core ML and ONNX Runtime publish none) + the store tensors resident while it runs
(those not paged, and the paged ones it reads or writes); `paged_bytes`: the live paged tensors (layer
inputs, LoRA state, gradients) that stay in their files during the call (README, "Paged state").

measured bytes of a call = peak resident set size during the call (Linux VmHWM, reset before each
call through /proc/self/clear_refs) minus the process's RSS once the runtime was imported, before any
graph was loaded or tensor created (so the runtimes' own buffers for loaded graphs count). It runs in a fresh subprocess, after one warm-up step;
ONNX Runtime's CPU arena is disabled so the figure follows tensor lifetimes.
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from runtime_harness.runner import BundleError, BundleRunner, load_manifest


def planned(manifest: dict, schedule: str = "train_step") -> list[dict]:
    """Per call: graph, layer, and the manifest's planned bytes split into weights / arena / store."""
    return [{"index": k, "graph": e["graph"], "layer": e["layer"], **e["memory"]}
            for k, e in enumerate(manifest["schedules"][schedule]) if e["op"] == "call"]


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    """Return freed heap to the OS (glibc keeps it otherwise), then restart the peak at the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _import_runtime(backend: str) -> None:
    """Import the runtime's Python module, so that the baseline holds the runtime but no graph."""
    import importlib

    module = {"executorch": "executorch.runtime", "ort": "onnxruntime", "coreml": "coremltools"}[backend]
    importlib.import_module(module)


def probe(bundle: Path, runtime: str | None, schedule: str, seed: int) -> dict:
    """Runs inside the fresh subprocess: load, baseline, warm-up step, then a measured step."""
    import gc

    from runtime_harness.verify import nonzero_adapter, seeded_batch

    runner = BundleRunner(bundle, runtime, check_files=False)  # measure() checked them
    _import_runtime(runner.manifest["backend"])
    gc.collect()
    baseline = _proc_status()["VmRSS"]
    store = runner.initial_state(nonzero_adapter(runner.manifest, seed))
    ids, labels = seeded_batch(runner.manifest, seed)
    runner.step(store, ids, labels, lr=0.0, schedule=schedule)  # warm-up
    gc.collect()
    per_call: list[dict] = []

    def after(record) -> None:
        per_call.append({"index": record.index, "graph": record.graph, "layer": record.layer,
                         "seconds": record.seconds, "measured_bytes": _proc_status()["VmHWM"] - baseline})
        _reset_peak()

    _reset_peak()
    loss, trace = runner.step(store, ids, labels, lr=0.0, schedule=schedule, on_call=after)
    return {"baseline_rss_bytes": baseline, "loss": loss, "step_seconds": trace.seconds, "calls": per_call,
            "runtime": runner.backend.runtime or runner.backend.name,
            "peak_measured_bytes": max(c["measured_bytes"] for c in per_call)}


def measure(bundle: Path, runtime: str | None = None, schedule: str = "train_step", seed: int = 0) -> dict:
    """Planned and measured memory of one step of `schedule`, per call and peak."""
    manifest = load_manifest(bundle)
    if sys.platform != "linux":
        raise BundleError("measured memory reads /proc (Linux); use the planned figures elsewhere")
    cmd = [sys.executable, "-m", "runtime_harness.memory", str(bundle), runtime or "", schedule, str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"memory probe failed: {tail}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = planned(manifest, schedule)
    by_index = {c["index"]: c for c in measured["calls"]}
    calls = [{**p, "measured_bytes": by_index[p["index"]]["measured_bytes"], "seconds": by_index[p["index"]]["seconds"]}
             for p in plan]
    peak_call = max(calls, key=lambda c: c["planned_bytes"])
    return {
        "bundle": str(bundle), "backend": manifest["backend"], "method": manifest["method"], "schedule": schedule,
        "seq_len": manifest["seq_len"], "calls": calls,
        "peak_planned_bytes": peak_call["planned_bytes"], "peak_planned_call": peak_call["graph"],
        "peak_measured_bytes": measured["peak_measured_bytes"], "step_seconds": measured["step_seconds"],
        "baseline_rss_bytes": measured["baseline_rss_bytes"], "runtime": measured["runtime"],
    }


def plot_timeline(reports: dict[str, dict], path: Path, title: str) -> None:
    """Planned (solid) and measured (dashed) MB per call of one step, one line pair per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for k, (label, rep) in enumerate(reports.items()):
        color = f"C{k}"
        x = np.arange(len(rep["calls"]))
        ax.plot(x, [c["planned_bytes"] / 1e6 for c in rep["calls"]], color=color, label=f"{label} planned")
        if all(c.get("measured_bytes") is not None for c in rep["calls"]):
            ax.plot(x, [c["measured_bytes"] / 1e6 for c in rep["calls"]], color=color, ls="--",
                    label=f"{label} measured")
    ax.set_xlabel("call in one training step (embedding chunks, layers forward, loss head, layers backward + update)")
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SPLIT = (("weights_bytes", "frozen weights read"), ("arena_bytes", "arena"), ("store_bytes", "resident store"),
         ("paged_bytes", "paged (in files)"))


def plot_split(reports: dict[str, dict], path: Path, title: str) -> None:
    """One panel per report: each call's planned bytes stacked as weights / arena / resident store, the paged
    tensors (in files, not resident) hatched on top, and the measured peak dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(10, 3.2 * len(reports)), squeeze=False, sharey=True)
    for ax, (label, rep) in zip(axes[:, 0], reports.items()):
        x = np.arange(len(rep["calls"]))
        bottom = np.zeros(len(x))
        for k, (key, name) in enumerate(SPLIT):
            mb = np.array([(c.get(key) or 0) / 1e6 for c in rep["calls"]])
            paged = key == "paged_bytes"
            ax.fill_between(x, bottom, bottom + mb, step="mid", label=name, color=f"C{k}",
                            alpha=0.15 if paged else 0.6, hatch="//" if paged else None, lw=0)
            bottom = bottom + mb
        if all(c.get("measured_bytes") is not None for c in rep["calls"]):
            ax.plot(x, [c["measured_bytes"] / 1e6 for c in rep["calls"]], color="k", ls="--", lw=1,
                    label="measured (peak RSS)")
        peak = max(c["planned_bytes"] for c in rep["calls"]) / 1e6
        ax.set_title(f"{label}: planned peak {peak:.1f} MB", fontsize=10)
        ax.set_ylabel("MB")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=5, loc="upper right")
    axes[-1, 0].set_xlabel("call in one training step (embedding chunks, layers forward, loss head, "
                           "layers backward + update)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    bundle_arg, runtime_arg, schedule_arg, seed_arg = sys.argv[1:5]
    import runtime_harness  # noqa: F401

    result = probe(Path(bundle_arg), runtime_arg or None, schedule_arg, int(seed_arg))
    print(json.dumps(result))
