"""`profile`: ONNX Runtime's profiler over one step of a bundle, summarized per operator and graph."""
from __future__ import annotations

import json

import pytest

from runtime_harness.cli import main as harness_main


def test_profile_reports_where_an_ort_step_goes(tiny_bundles, tmp_path, capsys):
    bundle = tiny_bundles("qwen2", "ort")
    out = tmp_path / "profile"
    assert harness_main(["profile", str(bundle), "--out", str(out), "--threads", "1"]) == 0
    s = json.loads((out / "profile.json").read_text())
    assert s["threads"] == 1 and s["schedule"] == "train_step"
    # only the profiled step counts (not the warm-up): ORT's runs fit inside the step, kernels inside runs
    assert 0 < s["kernel_seconds"] <= s["run_seconds"] <= s["step_seconds"]
    assert sum(r["seconds"] for r in s["by_op"]) == pytest.approx(s["kernel_seconds"])
    assert sum(g["seconds"] for g in s["by_graph"]) == pytest.approx(s["kernel_seconds"])
    assert {g["graph"] for g in s["by_graph"]} >= {"attn_forward", "mlp_block_forward", "mlp_block_backward",
                                                   "attn_backward", "head_chunk"}  # (sub-layer calls)
    manifest = json.loads((bundle / "manifest.json").read_text())
    calls = [e for e in manifest["schedules"]["train_step"] if e["op"] == "call"]
    layer_calls = sum(1 for e in calls if manifest["graphs"][e["graph"]]["kind"] == "attn_forward")
    matmuls = [r for r in s["by_op"] if r["op"] in ("MatMul", "FusedMatMul", "Gemm")]
    assert matmuls and s["matmul_seconds"] > 0 and s["matmul_gflop_per_s"] > 0
    assert sum(r["count"] for r in matmuls) >= 7 * layer_calls  # at least the seven projections per layer
    assert s["step_flops"] == sum(manifest["graphs"][e["graph"]]["flops"] for e in calls)
    assert (out / "profile.png").stat().st_size > 0 and len(s["traces"]) == len(manifest["graphs"])
    assert "matrix products" in capsys.readouterr().out


def test_profile_refuses_a_bundle_of_another_runtime(tiny_bundles, tmp_path, capsys):
    bundle = tiny_bundles("qwen2", "executorch")
    assert harness_main(["profile", str(bundle), "--out", str(tmp_path / "p")]) == 2
    assert "profile reads ONNX Runtime's profiler" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
