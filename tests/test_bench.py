"""The benchmark end to end on the tiny model: every method in its own process, one table, plots."""
from __future__ import annotations

import json

import pytest

from runtime_harness.cli import main as harness_main


def test_bench_runs_every_method_side_by_side(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    assert harness_main(["bench", "--model", str(tiny_checkpoint), "--runtime", "ort", "--seq-len", "16",
                         "--steps", "1", "--convergence-steps", "0", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["weights"].endswith(tiny_checkpoint.name)  # the checkpoint's own weights
    methods = report["methods"]
    assert set(methods) == {"mesp", "mebp", "autograd", "mezo"}
    for name, m in methods.items():
        assert m["step_time_s"] > 0 and m["peak_measured_bytes"] > 0
        assert set(m) == {"peak_planned_bytes", "peak_measured_bytes", "step_time_s", "grad_cosine", "step_gflop",
                          "gflop_per_s", "gemm_fraction"}
        assert m["step_gflop"] > 0 and m["gflop_per_s"] == pytest.approx(m["step_gflop"] / m["step_time_s"])
        assert m["gemm_fraction"] == pytest.approx(m["gflop_per_s"] / report["settings"]["gemm_gflop_per_s"])
    assert methods["autograd"]["peak_planned_bytes"] is None and methods["autograd"]["grad_cosine"] is None
    assert methods["mesp"]["grad_cosine"] >= 0.99999 and methods["mebp"]["grad_cosine"] >= 0.99999
    assert abs(methods["mezo"]["grad_cosine"]) < 0.5  # a one-sample SPSA estimate is nearly orthogonal
    # speed: one thread count everywhere; FLOPs from the manifest (mesp recomputes the forward: more than
    # autograd's forward + backward, less than twice); time per call for the bundle methods
    settings = report["settings"]
    assert settings["threads"] == 1 and settings["gemm_gflop_per_s"] == max(settings["gemm_gflop_per_s_before_after"])
    mesp_manifest = json.loads((out / "bundles" / f"{tiny_checkpoint.name}-ort-mesp" / "manifest.json").read_text())
    calls = [e for e in mesp_manifest["schedules"]["train_step"] if e["op"] == "call"]
    assert methods["mesp"]["step_gflop"] * 1e9 == pytest.approx(
        sum(mesp_manifest["graphs"][e["graph"]]["flops"] for e in calls))
    assert methods["autograd"]["step_gflop"] < methods["mesp"]["step_gflop"] < 2 * methods["autograd"]["step_gflop"]
    per_call = report["time_per_call"]
    assert set(per_call) == {"mesp", "mebp"} and len(per_call["mesp"]["calls"]) == len(calls)
    assert sum(g["share"] for g in per_call["mesp"]["by_graph"]) == pytest.approx(1.0)
    assert (out / "time_per_call.png").stat().st_size > 0
    table = (out / "bench.md").read_text()
    assert "GFLOP/s" in table and "Where the time of one mesp step goes" in table
    assert "| mesp |" in table and "time / mebp" in table
    assert (out / "memory_per_call.png").stat().st_size > 0 and (out / "memory_split.png").stat().st_size > 0
    # mesp runs each layer as sub-layer calls (attention, MLP blocks), mebp as one call per layer
    assert len(report["memory_per_call"]["mesp"]) > len(report["memory_per_call"]["mebp"]) > 0
