"""`train` on app data through a real bundle (ONNX Runtime, the fastest to build): a tiny checkpoint whose
ChatML tokenizer the test builds itself, chat / prompt-completion JSONL, eval curve and best adapter
checked against transformers + PEFT, exact resume, and bad data as one line with exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from exporter.build import Reporter, build
from exporter.cache import ArtifactCache
from exporter.config import BuildConfig
from exporter.integrity import write_manifest
from graphs.config import LoraConfig
from runtime_harness import reference
from runtime_harness.cli import main as harness_main

SEQ_LEN, BATCH = 48, 2
TOPICS = ["cats", "dogs", "fish", "owls", "bees", "cows", "ants", "elks", "yaks", "rams", "emus", "gnus"]


@pytest.fixture(scope="session")
def chat_bundle(chat_checkpoint, tmp_path_factory) -> Path:
    """ORT, AdamW (so resume has moments and a step count to carry), batch 2 (so eval batches get filler)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-chat-ort"
    cache = ArtifactCache(tmp_path_factory.getbasetemp() / "artifact-cache")
    build(BuildConfig(model=str(chat_checkpoint), backend="ort", out=out, optimizer="adamw",
                      lora=LoraConfig(rank=4, seq_len=SEQ_LEN, batch=BATCH), vocab_chunk_rows=128),
          Reporter(progress=False), cache)
    return out


def chat(topic: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{topic}?"},
                         {"role": "assistant", "content": f"I like {topic}."}]}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_csv(out: Path) -> list[list[str]]:
    return [line.split(",") for line in (out / "loss.csv").read_text().splitlines()]


def peft_loss(bundle: Path, adapter_dir: Path, data: Path) -> float:
    """transformers + PEFT loss over every row of `data` at once: the mean over all counted tokens."""
    from exporter.adapter import read_adapter
    from runtime_harness.data import load_codec, load_dataset

    manifest = json.loads((bundle / "manifest.json").read_text())
    ds = load_dataset(data, load_codec(bundle, manifest), manifest["seq_len"], 320)
    adapter = {k: v.numpy() for k, v in read_adapter(adapter_dir)[1].items()}
    model = reference.peft_model(reference.whole_model(manifest), manifest, adapter)
    return reference.loss_only(model, ds.ids, ds.labels)


CHAT_OK = chat("cats")


def test_the_bundle_carries_the_chat_template(chat_bundle):
    from transformers import AutoTokenizer

    assert (chat_bundle / "tokenizer" / "chat_template.jinja").is_file()
    assert AutoTokenizer.from_pretrained(str(chat_bundle / "tokenizer")).chat_template.startswith("{% for m in")


def test_chat_training_lowers_the_loss_with_an_eval_curve_and_best_adapter(chat_bundle, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(t) for t in TOPICS[:8]])
    held = write_jsonl(tmp_path / "eval.jsonl", [chat(t) for t in TOPICS[8:11]])  # 3 rows: one filler row
    out = tmp_path / "run"
    assert harness_main(["train", str(chat_bundle), "--data", str(train), "--eval-data", str(held), "--steps", "24",
                         "--lr", "0.01", "--eval-every", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chat data, 8 training examples (tokenizer), 3 eval examples" in printed
    rows = read_csv(out)
    assert rows[0] == ["step", "loss", "seconds", "eval_loss"] and len(rows) == 25
    train_losses = [float(r[1]) for r in rows[1:]]
    evals = {int(r[0]): float(r[3]) for r in rows[1:] if r[3]}
    assert sorted(evals) == [6, 12, 18, 24]
    before = peft_loss(chat_bundle, chat_bundle / "adapter", held)  # the untrained adapter (B = 0)
    assert np.mean(train_losses[-4:]) < np.mean(train_losses[:4]) - 1.0
    assert min(evals.values()) < before - 1.0
    assert (out / "loss.png").stat().st_size > 0
    state = json.loads((out / "train_state.json").read_text())
    best_step = min(evals, key=evals.get)
    assert state["best"]["step"] == best_step and f"best eval loss {evals[best_step]:.4f} at step {best_step}" in printed
    # both adapters load in PEFT, and PEFT's loss over the eval set is the eval loss logged for them
    assert abs(peft_loss(chat_bundle, out / "adapter-best", held) - evals[best_step]) <= 1e-4 * evals[best_step]
    assert abs(peft_loss(chat_bundle, out / "adapter", held) - evals[24]) <= 1e-4 * evals[24]
    assert not list(tmp_path.glob(".run.staging-*"))


def _train(bundle, *argv) -> None:
    assert harness_main(["train", str(bundle), *map(str, argv)]) == 0


def test_resume_continues_exactly(chat_bundle, tmp_path):
    """4 steps, then --resume for 3 more == 7 steps in one go: same adapter and AdamW state bits, same curve."""
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{t}?", "completion": f" I like {t}."} for t in TOPICS])
    common = ["--eval-fraction", "0.25", "--eval-every", "2", "--lr", "0.02", "--seed", "5"]
    _train(chat_bundle, "--data", data, "--steps", 7, "--out", tmp_path / "whole", *common)
    _train(chat_bundle, "--data", data, "--steps", 4, "--out", tmp_path / "split", *common)
    _train(chat_bundle, "--resume", tmp_path / "split", "--steps", 3)
    whole, split = tmp_path / "whole", tmp_path / "split"
    for rel in ("adapter/adapter_model.safetensors", "optimizer.safetensors", "adapter-best/adapter_model.safetensors"):
        a, b = load_file(str(whole / rel)), load_file(str(split / rel))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), rel
    steps = load_file(str(split / "optimizer.safetensors"))
    assert steps["optim.0.step"].tolist() == [7.0] and any(k.startswith("optim.0.exp_avg_sq.") for k in steps)
    drop_seconds = lambda rows: [[r[0], r[1], r[3]] for r in rows]  # noqa: E731
    assert drop_seconds(read_csv(split)) == drop_seconds(read_csv(whole))
    state = json.loads((split / "train_state.json").read_text())
    assert state["step"] == 7 and state["format"] == "prompt-completion" and state["seed"] == 5


def test_resume_refuses_other_data_and_a_folder_that_is_not_a_run(chat_bundle, tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", [chat(t) for t in TOPICS[:4]])
    _train(chat_bundle, "--data", data, "--steps", 1, "--out", tmp_path / "run")
    before = (tmp_path / "run" / "train_state.json").read_text()
    capsys.readouterr()  # the run's own output
    other = write_jsonl(tmp_path / "b.jsonl", [chat(t) for t in TOPICS[4:8]])
    for argv, message in ((["--resume", tmp_path / "run", "--data", other], "is not the data"),
                          (["--resume", tmp_path], "is not a train run folder")):
        assert harness_main(["train", str(chat_bundle), "--steps", "1", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    assert (tmp_path / "run" / "train_state.json").read_text() == before




@pytest.mark.parametrize("records, line, message", [
    ([CHAT_OK, '{"messages": [{"role": "user", "content": "hi"}'], 2, "malformed JSON"),
    ([CHAT_OK, {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}], 2, "needs a `role`"),
    ([CHAT_OK, CHAT_OK, {"messages": [{"role": "robot", "content": "hi"}]}], 3, "unknown role 'robot'"),
    ([CHAT_OK, {"messages": [{"role": "user", "content": "hi"}]}], 2, "no assistant turn"),
    ([CHAT_OK, {"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]}], 2,
     f"every label is masked after truncation to {SEQ_LEN} tokens"),
    ([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2, 320]}], 2, "token id 320 is outside the model's vocabulary"),
    ([{"input_ids": [1, 2, 3], "labels": [1, -100, -100]}], 1, "every label is masked"),
])
@pytest.mark.parametrize("which", ["data", "eval-data"])
def test_bad_data_is_one_line_with_file_and_line_exit_2(chat_bundle, tmp_path, capsys, records, line, message,
                                                         which):
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    good = write_jsonl(tmp_path / "good.jsonl", [chat(t) for t in TOPICS[:4]] if "messages" in str(records[0])
                       else [{"input_ids": [1, 2, 3]}] * 4)
    data, eval_data = (bad, good) if which == "data" else (good, bad)
    out = tmp_path / "run"
    assert harness_main(["train", str(chat_bundle), "--data", str(data), "--eval-data", str(eval_data),
                         "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}, line {line}: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]  # nothing written


def test_messages_need_the_checkpoints_chat_template(chat_bundle, tmp_path, capsys):
    bundle = tmp_path / "no-template"
    shutil.copytree(chat_bundle, bundle)
    (bundle / "tokenizer" / "chat_template.jinja").unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["tokenizer/chat_template.jinja"]
    write_manifest(bundle, manifest)
    data = write_jsonl(tmp_path / "c.jsonl", [CHAT_OK])
    assert harness_main(["train", str(bundle), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}, line 1: ") and "its tokenizer has no chat template" in err
    assert not (tmp_path / "o").exists()


def test_byte_level_bundles_train_on_jsonl_on_every_runtime(tiny_bundle, tmp_path, capsys):
    """The tokenizer-less tiny bundles (ExecuTorch and ORT, sequence 16, bytes): prompt-completion JSONL with
    a held-out eval file; the logged eval loss is PEFT's loss of the saved adapter on the eval rows."""
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"{t}?", "completion": f" {t}!"} for t in TOPICS[:6]])
    held = write_jsonl(tmp_path / "ev.jsonl", [{"input_ids": [99, 97, 116, 115, 63, 32, 99, 97, 116],
                                                "labels": [-100] * 5 + [32, 99, 97, 116]}])
    out = tmp_path / "run"
    _train(tiny_bundle, "--data", data, "--eval-data", held, "--steps", 4, "--eval-every", 2, "--lr", 0.05,
           "--out", out)
    assert "prompt-completion data, 6 training examples (bytes), 1 eval examples" in capsys.readouterr().out
    evals = [float(r[3]) for r in read_csv(out)[1:] if r[3]]
    assert len(evals) == 2
    assert abs(peft_loss(tiny_bundle, out / "adapter", held) - evals[-1]) <= 1e-4 * evals[-1]
    chat_data = write_jsonl(tmp_path / "c.jsonl", [CHAT_OK])
    assert harness_main(["train", str(tiny_bundle), "--data", str(chat_data), "--steps", "1",
                         "--out", str(tmp_path / "o")]) == 2
    assert f"{chat_data}, line 1: " in capsys.readouterr().err and not (tmp_path / "o").exists()
