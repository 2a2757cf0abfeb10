"""Step time against the machine's limit: FLOPs of a schedule, GEMM throughput, time per call.

  step FLOPs     sum over the schedule's calls of the manifest's per-graph `flops` (matrix products,
                 2 per multiply-add, counted from the shapes at build time: `exporter.flops`); MeZO runs
                 the eval schedule twice; the autograd baseline is counted by torch's FlopCounterMode on
                 its own step;
  GEMM limit     float32 `torch.mm` of the model's widest layer product, (seq, hidden) x (hidden,
                 intermediate), timed in the bench's own process with the bench's thread count: what
                 this machine's BLAS reaches on the shapes a step multiplies;
  achieved       step FLOPs / step time, and its fraction of the GEMM limit;
  per call       seconds of each call of one step, summed per graph kind ("where the time goes"), and a plot.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def schedule_flops(manifest: dict, schedule: str = "train_step") -> int | None:
    """FLOPs of one run of `schedule` (None: a bundle built before graphs carried `flops`)."""
    total = 0
    for entry in manifest["schedules"][schedule]:
        if entry["op"] != "call":
            continue
        flops = manifest["graphs"][entry["graph"]].get("flops")
        if flops is None:
            return None
        total += flops
    return total


def gemm_throughput(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of float32 (m, k) @ (k, n) with torch's current thread count: the best of repeated
    timings over about `seconds` (after a warm-up), 2 m k n FLOPs per product."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2.0 * m * k * n / best


def widest_product(manifest: dict) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate): the largest matrix product shape of a layer."""
    spec = manifest["model"]["architecture"]
    return manifest["batch"] * manifest["seq_len"], spec["hidden_size"], spec["intermediate_size"]


def time_by_graph(calls: list[dict], manifest: dict) -> list[dict]:
    """Per graph kind: calls, seconds, share of the step, FLOPs and achieved GFLOP/s."""
    total = sum(c["seconds"] for c in calls) or 1.0
    rows: dict[str, dict] = {}
    for c in calls:
        graph = manifest["graphs"].get(c["graph"], {})
        kind = graph.get("kind", c["graph"])
        row = rows.setdefault(kind, {"kind": kind, "calls": 0, "seconds": 0.0, "flops": 0})
        row["calls"] += 1
        row["seconds"] += c["seconds"]
        row["flops"] += graph.get("flops") or 0
    for row in rows.values():
        row["share"] = row["seconds"] / total
        row["gflop_per_s"] = row["flops"] / row["seconds"] / 1e9 if row["seconds"] > 0 and row["flops"] else None
    return sorted(rows.values(), key=lambda r: -r["seconds"])


def plot_call_times(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Milliseconds of every call of one step, one line per method (log scale: layer calls and the
    small embedding / optimizer calls differ by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for k, (label, calls) in enumerate(runs.items()):
        ax.step(np.arange(len(calls)), [c["seconds"] * 1e3 for c in calls], where="mid", color=f"C{k}",
                label=f"{label} (step {sum(c['seconds'] for c in calls):.2f} s)")
    ax.set_yscale("log")
    ax.set_xlabel("call in one training step (embedding chunks, layers forward, loss head, layers backward + update)")
    ax.set_ylabel("ms per call")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
