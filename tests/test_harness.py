"""The runtime harness on real runtimes (ExecuTorch, ONNX Runtime, Core ML: the framework on macOS, the NumPy
MIL interpreter elsewhere): verify, grads, train, memory, and a corrupted backward graph that verify must
catch. One tiny bundle per runtime (conftest.tiny_bundle)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from exporter.integrity import resign
from graphs.config import LoraConfig
from runtime_harness import reference
from runtime_harness.cli import main as harness_main
from runtime_harness.verify import compare, nonzero_adapter, seeded_batch, verify


def test_verify_passes(tiny_bundle, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert harness_main(["verify", str(tiny_bundle), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["worst"]["cosine"] >= 0.99999 and report["worst"]["max_rel_err"] <= 1e-4
    assert len(report["tensors"]) == 28
    assert "PASS" in capsys.readouterr().out


def test_verify_catches_a_corrupted_backward_graph(tiny_bundle, tmp_path, monkeypatch):
    """Re-lower the layer program with one weight of the backward perturbed (dB of v_proj scaled by 1.001)."""
    import exporter.graph_defs as gd
    from exporter.backends import get_backend

    bundle = tmp_path / "corrupted"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    backend = get_backend(manifest["backend"])
    # the graph whose output is v_proj's dB: the whole layer's backward, or a split bundle's attention backward
    module = gd.LayerBackward if backend.weights_in_graphs else gd.AttentionBackward
    original = module.forward

    def perturbed(self, *args):
        out = list(original(self, *args))
        names = self.shapes.lora_names() if module is gd.LayerBackward else list(self.part.lora)
        k = 1 + names.index("self_attn.v_proj.lora_B")
        out[k] = out[k] * 1.001
        return tuple(out)

    monkeypatch.setattr(module, "forward", perturbed)
    from exporter.graph_defs import StepShapes, layer_backward_graph, layer_forward_graph, layer_graphs
    from graphs.config import MLP_BLOCKS, ModelSpec

    spec = ModelSpec(**manifest["model"]["architecture"])
    blocks = sum(manifest["graphs"][e["graph"]]["kind"] == "mlp_block_forward"
                 for e in manifest["schedules"]["eval_loss"] if e["op"] == "call" and e["layer"] == 0)
    shapes = StepShapes(spec, LoraConfig(rank=4, seq_len=16), vocab_chunk_rows=128, mlp_blocks=blocks or MLP_BLOCKS,
                        split_layers=not backend.weights_in_graphs)
    if backend.weights_in_graphs:  # Core ML: layer 1's own package, with its weights baked in
        weights = reference.source_weights(manifest).layer(1)
        backend.lower("layer_01", [layer_forward_graph(shapes, weights), layer_backward_graph(shapes, weights)], bundle)
    else:
        backend.lower("layer", layer_graphs(shapes, spec.attention_kinds[0]), bundle)
    resign(bundle, manifest)  # re-sign, so that only the math can give it away
    report = verify(bundle, seed=0)
    assert not report["ok"]
    bad = [r["name"] for r in report["tensors"] if not r["ok"]]
    assert bad and all("v_proj.lora_B" in name for name in bad)
    assert harness_main(["verify", str(bundle), "--report", str(tmp_path / "r.json")]) == 1


def test_grads_equal_the_reference(tiny_bundle, tmp_path):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ids, labels = seeded_batch(manifest, 7)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "labels.npy", labels)
    adapter_dir = tmp_path / "adapter"
    from exporter.adapter import write_adapter

    adapter = nonzero_adapter(manifest, 7)
    write_adapter(adapter_dir, {k: torch.from_numpy(v) for k, v in adapter.items()},
                  json.loads((tiny_bundle / "adapter" / "adapter_config.json").read_text()))
    out = tmp_path / "grads.safetensors"
    assert harness_main(["grads", str(tiny_bundle), "--input-ids", str(tmp_path / "ids.npy"), "--labels",
                         str(tmp_path / "labels.npy"), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    grads = load_file(str(out))
    ref_loss, ref = reference.layerwise_loss_and_grads(manifest, reference.source_weights(manifest), adapter, ids,
                                                       labels)
    assert set(grads) == set(ref)
    for name in ref:
        cosine, rel = compare(grads[name], ref[name])
        assert cosine >= 0.99999 and rel <= 1e-4, name


def test_train_lowers_the_loss_and_its_adapter_loads_in_peft(tiny_bundle, tiny_checkpoint, tmp_path):
    import peft
    import transformers

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    out = tmp_path / "run"
    assert harness_main(["train", str(tiny_bundle), "--data", str(text), "--steps", "12", "--lr", "0.05",
                         "--out", str(out)]) == 0
    losses = [float(line.split(",")[1]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.05
    assert (out / "loss.png").stat().st_size > 0
    model = peft.PeftModel.from_pretrained(transformers.Qwen2ForCausalLM.from_pretrained(str(tiny_checkpoint)),
                                           str(out / "adapter"))
    ids = np.frombuffer(text.read_bytes()[:16], dtype=np.uint8).astype(np.int64)[None]
    peft_loss = reference.loss_only(model, ids, ids)
    from runtime_harness.runner import BundleRunner
    from exporter.adapter import read_adapter

    runner = BundleRunner(tiny_bundle)
    store = runner.initial_state({k: v.numpy() for k, v in read_adapter(out / "adapter")[1].items()})
    bundle_loss, _ = runner.step(store, ids, ids, lr=0.0, schedule="eval_loss")
    assert abs(bundle_loss - peft_loss) <= 1e-4 * abs(peft_loss)


def test_memory_report_and_plot(tiny_bundle, tmp_path):
    assert harness_main(["memory", str(tiny_bundle), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "memory.json").read_text())
    n_calls = sum(e["op"] == "call" for e in json.loads((tiny_bundle / "manifest.json").read_text())
                  ["schedules"]["train_step"])
    assert len(report["calls"]) == n_calls
    assert all(c["planned_bytes"] > 0 and c["measured_bytes"] is not None for c in report["calls"])
    assert report["peak_planned_bytes"] == max(c["planned_bytes"] for c in report["calls"])
    for c in report["calls"]:  # the split: weights + arena + resident store; paged tensors are not resident
        assert c["planned_bytes"] == c["weights_bytes"] + (c["arena_bytes"] or 0) + c["store_bytes"]
    assert max(c["paged_bytes"] for c in report["calls"]) > 0
    assert (tmp_path / "memory.png").stat().st_size > 0 and (tmp_path / "memory_split.png").stat().st_size > 0


@pytest.mark.parametrize("mutate, message", [
    (lambda b: (b / "weights" / "final_norm.safetensors").unlink(), "final_norm.safetensors is missing"),
    (lambda b: (b / "adapter" / "adapter_model.safetensors").write_bytes(b"x"), "was altered"),
])
def test_damaged_bundle_is_one_line_exit_2(tiny_bundle, tmp_path, capsys, mutate, message):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    mutate(bundle)
    assert harness_main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bad_batch_and_adapter_exit_2(tiny_bundle, tmp_path, capsys):
    np.save(tmp_path / "short.npy", np.zeros((1, 8), dtype=np.int64))
    np.save(tmp_path / "oov.npy", np.full((1, 16), 320, dtype=np.int64))
    for ids, message in (("short.npy", "shape [1, 8]"), ("oov.npy", "token ids must be in [0, 320)")):
        assert harness_main(["grads", str(tiny_bundle), "--input-ids", str(tmp_path / ids),
                             "--out", str(tmp_path / "g.safetensors")]) == 2
        assert message in capsys.readouterr().err
    from exporter.adapter import write_adapter

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    wrong_rank = {t["init"]["adapter"]: torch.zeros(t["shape"][0] * 2 if "lora_A" in t["init"]["adapter"] else t["shape"][0],
                                                    t["shape"][1] if "lora_A" in t["init"]["adapter"] else t["shape"][1] * 2)
                  for t in manifest["state"]}
    write_adapter(tmp_path / "rank8", wrong_rank, {"r": 8})
    np.save(tmp_path / "ok.npy", np.zeros((1, 16), dtype=np.int64))
    assert harness_main(["grads", str(tiny_bundle), "--input-ids", str(tmp_path / "ok.npy"), "--adapter",
                         str(tmp_path / "rank8"), "--out", str(tmp_path / "g.safetensors")]) == 2
    assert "rank 4" in capsys.readouterr().err
    assert not (tmp_path / "g.safetensors").exists()


def test_runtime_that_cannot_run_the_bundle_is_one_line_exit_2(tiny_bundle, tmp_path, capsys):
    """`--runtime mil` runs Core ML bundles only; a Core ML bundle runs on coreml or mil only."""
    backend = json.loads((tiny_bundle / "manifest.json").read_text())["backend"]
    other = "ort" if backend == "coreml" else "mil"
    assert harness_main(["verify", str(tiny_bundle), "--runtime", other, "--report", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is a {backend} bundle; it cannot run on {other}" in err[0]
