"""ONNX Runtime session settings, timed side by side on one bundle (interleaved rounds in one process).

    python docs/benchmarks/ort_session_options.py BUNDLE [ROUNDS]

Each variant is a fresh `OrtBackend` whose sessions are created with the bundle's default options
(`exporter.backends.ort.session_options`) changed in one way; every variant runs a warm-up step, then
ROUNDS rounds run every variant once in turn (so machine noise hits all alike). Prints the median step
time per variant and its ratio to the default.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def variants():
    import onnxruntime as ort

    def arena(so):
        so.enable_cpu_mem_arena = True

    def extended(so):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED

    def basic(so):
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

    def no_spin(so):
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def one_thread(so):
        so.intra_op_num_threads = 1

    return {"default": (None, []), "cpu arena on": (arena, []), "optimization EXTENDED": (extended, []),
            "optimization BASIC": (basic, []), "no spinning": (no_spin, []), "1 thread": (one_thread, []),
            "no GatherSliceToSplitFusion": (None, ["GatherSliceToSplitFusion"]),
            "no MatmulTransposeFusion": (None, ["MatmulTransposeFusion"])}


def backend_for(change, disabled):
    import onnxruntime as ort

    from exporter.backends import ort as ort_backend

    class Variant(ort_backend.OrtBackend):
        def _session(self, path):
            path = Path(path).resolve()
            if path not in self._sessions:
                so = ort_backend.session_options()
                if change:
                    change(so)
                self._sessions[path] = ort.InferenceSession(str(path), sess_options=so,
                                                            providers=["CPUExecutionProvider"],
                                                            disabled_optimizers=disabled)
            return self._sessions[path]

    return Variant()


def main(bundle: Path, rounds: int) -> None:
    from runtime_harness.runner import BundleRunner
    from runtime_harness.verify import nonzero_adapter, seeded_batch

    runs = {}
    for name, (change, disabled) in variants().items():
        runner = BundleRunner(bundle, check_files=False, backend_instance=backend_for(change, disabled))
        runner.load_all()
        store = runner.initial_state(nonzero_adapter(runner.manifest, 0))
        runs[name] = (runner, store, [])
    ids, labels = seeded_batch(runs["default"][0].manifest, 0)
    for runner, store, _ in runs.values():
        runner.step(store, ids, labels, 0.0)  # warm-up
    for r in range(rounds):
        for name, (runner, store, times) in runs.items():
            t0 = time.perf_counter()
            runner.step(store, ids, labels, 0.0)
            times.append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, (_, _, t) in runs.items()), flush=True)
    base = np.median(runs["default"][2])
    print(f"{'variant':<32} {'median s':>9} {'vs default':>10}")
    for name, (_, _, times) in runs.items():
        print(f"{name:<32} {np.median(times):>9.2f} {np.median(times) / base:>9.2f}x")


if __name__ == "__main__":
    import runtime_harness  # noqa: F401

    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3)
