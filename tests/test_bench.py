"""The benchmark end to end on the tiny model: every method in its own process, one table, plots."""
from __future__ import annotations

import json

from runtime_harness.cli import main as harness_main


def test_bench_runs_every_method_side_by_side(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    assert harness_main(["bench", "--model", str(tiny_checkpoint), "--runtime", "ort", "--seq-len", "16",
                         "--steps", "1", "--convergence-steps", "0", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["weights"].endswith(tiny_checkpoint.name)  # the checkpoint's own weights
    methods = report["methods"]
    assert set(methods) == {"mesp", "mebp", "autograd", "mezo"}
    for name, m in methods.items():
        assert m["step_time_s"] > 0 and m["peak_measured_bytes"] > 0
        assert set(m) == {"peak_planned_bytes", "peak_measured_bytes", "step_time_s", "grad_cosine"}
    assert methods["autograd"]["peak_planned_bytes"] is None and methods["autograd"]["grad_cosine"] is None
    assert methods["mesp"]["grad_cosine"] >= 0.99999 and methods["mebp"]["grad_cosine"] >= 0.99999
    assert abs(methods["mezo"]["grad_cosine"]) < 0.5  # a one-sample SPSA estimate is nearly orthogonal
    table = (out / "bench.md").read_text()
    assert "| mesp |" in table and "time / mebp" in table
    assert (out / "memory_per_call.png").stat().st_size > 0
    assert len(report["memory_per_call"]["mesp"]) == len(report["memory_per_call"]["mebp"])
