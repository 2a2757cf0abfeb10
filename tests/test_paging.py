"""Paged state (README, "Paged state"): the planned memory counts as resident only what a call touches of the
paged tensors (layer inputs, LoRA state, gradients, optimizer state), and the runner keeps them in page files
between calls, never rewrites one (a copied store keeps its values), and leaves no page file behind, also
when a signal stops it."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exporter.bundle_format import DTYPE_BYTES, PAGED, is_paged
from runtime_harness.runner import BundleRunner, PagedTensor, resident_bytes
from runtime_harness.verify import nonzero_adapter, seeded_batch


def _bytes(t: dict) -> int:
    return int(np.prod(t["shape"], dtype=np.int64)) * DTYPE_BYTES[t["dtype"]]


def test_the_paged_patterns():
    assert all(is_paged(n) for n in ("x.0", "x.24", "lora.3.mlp.up_proj.lora_A", "grad.0.self_attn.q_proj.lora_B",
                                     "optim.2.step", "optim.2.exp_avg_sq.mlp.down_proj.lora_B"))
    assert not any(is_paged(n) for n in ("dy", "lr", "loss", "batch.input_ids", "embed.acc", "head.P"))
    assert not is_paged("lora.0.x", ())  # a bundle without `paged` pages nothing


def test_planned_store_is_what_is_not_paged_plus_what_the_call_touches(tiny_bundle):
    """Replays the data flow of every schedule: store_bytes = live unpaged + touched paged, paged_bytes = the rest."""
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["paged"] == list(PAGED)
    for name, schedule in manifest["schedules"].items():
        live = {t["name"]: _bytes(t) for t in manifest["state"] + manifest["step_inputs"]}
        paged_seen = 0
        for e in schedule:
            if e["op"] == "fill":
                live[e["tensor"]] = _bytes(e)
                continue
            if e["op"] == "call":
                graph = manifest["graphs"][e["graph"]]
                for t in graph["outputs"]:
                    target = e["outputs"][t["name"]]
                    if isinstance(target, str):  # (a slice target writes into a live tensor)
                        live[target] = _bytes(t)
                refs = [*e["inputs"].values(), *e["outputs"].values()]
                touched = {r if isinstance(r, str) else r["tensor"] for r in refs
                           if isinstance(r, str) or ("tensor" in r and "file" not in r)}
                resident = sum(b for n, b in live.items() if n in touched or not is_paged(n))
                mem = e["memory"]
                assert mem["store_bytes"] == resident, (name, e["graph"], e["layer"])
                assert mem["paged_bytes"] == sum(live.values()) - resident
                assert mem["planned_bytes"] == mem["weights_bytes"] + (mem["arena_bytes"] or 0) + resident
                paged_seen = max(paged_seen, mem["paged_bytes"])
            for n in e["free"]:
                live.pop(n, None)
        assert paged_seen > 0, name


def test_the_runner_keeps_paged_tensors_in_files_and_removes_them(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    runner = BundleRunner(tiny_bundle)
    store = runner.initial_state(nonzero_adapter(manifest, 0))
    ids, labels = seeded_batch(manifest, 0)
    resident = {}
    runner.step(store, ids, labels, 0.01, on_call=lambda r: resident.__setitem__(r.index, r.store_bytes))
    assert store and all(isinstance(v, PagedTensor) for v in store.values())  # the state: LoRA (and AdamW)
    assert resident_bytes(store) == 0
    planned = {k: e["memory"]["store_bytes"] for k, e in enumerate(manifest["schedules"]["train_step"])
               if e["op"] == "call"}
    assert resident.keys() == planned.keys()
    assert all(resident[k] <= planned[k] for k in planned), [(k, resident[k], planned[k]) for k in planned]
    pages = Path(runner._pages.path)
    assert len(list(pages.glob("*.page"))) == len(store)  # one file per live tensor: replaced values are gone
    # a copy of the store keeps its values while the step changes the other (train's all-or-nothing steps)
    before = {k: np.asarray(v).copy() for k, v in store.items()}
    copy = dict(store)
    runner.step(copy, ids, labels, 0.5)
    assert all(np.array_equal(np.asarray(store[k]), before[k]) for k in store)
    assert any(not np.array_equal(np.asarray(copy[k]), before[k]) for k in copy)
    del runner, store, copy
    gc.collect()
    assert not pages.exists()


def test_a_signal_leaves_no_page_files(ort_bundle, tmp_path):
    """A long `train` on SIGTERM: exit 143, and its page folder is gone."""
    text = tmp_path / "data.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "runtime_harness", "train", str(ort_bundle), "--data", str(text),
                             "--steps", "100000", "--out", str(tmp_path / "run")],
                            env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(scratch.glob("ondevice-lora-pages-*/*.page")):
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert list(scratch.iterdir()) == [], list(scratch.rglob("*"))


@pytest.fixture
def ort_bundle(tiny_bundles) -> Path:
    return tiny_bundles("qwen2", "ort")


def test_programs_the_next_calls_do_not_use_are_released(tiny_bundle, monkeypatch):
    """After a call, a program none of the next KEEP_LOADED calls uses is released (its arenas go): the layer
    program twice a step (after the forward, after the backward), the others once, and nothing stays loaded."""
    from runtime_harness.runner import KEEP_LOADED

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    runner = BundleRunner(tiny_bundle)
    released = []
    monkeypatch.setattr(runner.backend, "release", lambda bundle, file: released.append(file))
    loaded = []
    runner.step(runner.initial_state(nonzero_adapter(manifest, 0)), *seeded_batch(manifest, 0), 0.01,
                on_call=lambda r: loaded.append({manifest["graphs"][g]["file"] for g in runner._fns}))
    if not runner.backend.releases_programs:  # sessions costly to create stay loaded
        assert released == [] and {g for g in runner._fns} == {e["graph"] for e in manifest["schedules"]["train_step"]
                                                               if e["op"] == "call"}
        return
    assert runner._fns == {}
    files = [manifest["graphs"][e["graph"]]["file"] for e in manifest["schedules"]["train_step"] if e["op"] == "call"]
    for n, held in enumerate(loaded):  # before call n's release: at most what calls n - KEEP_LOADED .. n use
        assert held <= set(files[max(0, n - KEEP_LOADED):n + 1]), (n, held)
    layer_files = {manifest["graphs"][g]["file"] for g in manifest["graphs"] if manifest["graphs"][g]["role"] == "layer"}
    for f in set(files):
        runs = sum(1 for k in range(len(files)) if files[k] == f and (k + 1 == len(files) or
                                                                    f not in files[k + 1:k + 1 + KEEP_LOADED]))
        assert released.count(f) == runs, f
    assert all(released.count(f) == 2 for f in layer_files if len(layer_files) == 1)
