"""The command lines: registry listing, and bad input as one line with exit code 2 and nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import main as exporter_main
from runtime_harness.cli import main as harness_main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert "Traceback" not in err[0]
    return err[0]


def test_list_models_prints_the_papers_lora_counts(capsys):
    assert exporter_main(["list-models"]) == 0
    out = capsys.readouterr().out
    for name, layers, hidden, total, lora in [("qwen2.5-0.5b", 24, 896, "494,032,768", "4,399,104"),
                                              ("qwen2.5-1.5b", 28, 1536, "1,543,714,304", "9,232,384"),
                                              ("qwen2.5-3b", 36, 2048, "3,085,938,688", "14,966,784"),
                                              # the LoRA counts of rank 8 on all seven projections
                                              # (/work/shared/reference/models.md; gemma-3-1b: the MeBP paper's 6.52M)
                                              ("qwen3-0.6b", 28, 1024, "596,049,920", "5,046,272"),
                                              ("qwen3-1.7b", 28, 2048, "1,720,574,976", "8,716,288"),
                                              ("qwen3-4b", 36, 2560, "4,022,468,096", "16,515,072"),
                                              ("gemma-3-1b", 26, 1152, "999,885,952", "6,522,880"),
                                              ("gemma-3-4b", 34, 2560, "3,880,263,168", "14,901,248"),
                                              ("llama-3.2-1b", 16, 2048, "1,235,814,400", "5,636,096"),
                                              ("llama-3.2-3b", 28, 3072, "3,212,749,824", "12,156,928")]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert line.split()[2:] == [str(layers), str(hidden), total, lora]


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-9b", "--backend", "ort"], "unknown model 'llama-9b'; choose from qwen2.5-0.5b"),
    (["--model", "qwen2.5-0.5b", "--backend", "tflite"], "invalid choice: 'tflite'"),
    (["--model", "qwen2.5-0.5b", "--backend", "ort", "--weights", "random", "--lora-rank", "200"],
     "LoRA rank 200 is larger than the smallest adapted dimension (128)"),
    (["--model", "qwen2.5-0.5b", "--backend", "ort", "--weights", "random", "--seq-len", "1"],
     "sequence length must be at least 2"),
    (["--model", "qwen2.5-0.5b", "--backend", "ort", "--weights", "random", "--lora-targets", "q,zz"],
     "unknown LoRA target(s) ['zz']"),
    (["--model", "qwen2.5-0.5b", "--backend", "ort", "--weights", "/nonexistent/ckpt"],
     "neither an existing folder nor a Hugging Face repo id"),
])
def test_build_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(exporter_main, ["build", *argv, "--out", str(tmp_path / "out")]) == 2
    assert message in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def _exit_code(main, argv) -> int:
    """main's return value, or the code of the SystemExit argparse raises on bad flags."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_every_registry_family_resolves_for_a_build(tmp_path):
    """Every registry model (every family) passes build's checks with random weights: spec, LoRA, budget."""
    from exporter.build import resolve
    from exporter.config import BuildConfig
    from exporter.registry import MODELS
    from graphs.family import families

    seen = set()
    for name, spec in MODELS.items():
        r = resolve(BuildConfig(model=name, backend="ort", weights="random", out=tmp_path / name))
        assert r.spec == spec and r.shapes.lora_names()
        seen.add(spec.family)
    assert seen == set(families())


def test_checkpoint_of_another_family_is_refused(family_checkpoint, capsys, tmp_path):
    out = tmp_path / "out"
    argv = ["build", "--model", "gemma-3-1b", "--backend", "ort", "--weights", str(family_checkpoint("qwen3")),
            "--out", str(out)]
    capsys.readouterr()  # the checkpoint's own save_pretrained progress
    assert exporter_main(argv) == 2
    assert "is a qwen3 model (model_type 'qwen3'), but gemma-3-1b is gemma3" in _one_error_line(capsys)
    assert not out.exists()


def test_offline_registry_model_names_both_ways_out(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert exporter_main(["build", "--model", "qwen2.5-0.5b", "--backend", "ort", "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert "--weights PATH" in line and "--weights random" in line
    assert not (tmp_path / "o").exists()


def test_mismatched_checkpoint_and_unwritable_output(tiny_checkpoint, capsys, tmp_path):
    # the tiny checkpoint is not a Qwen2.5-0.5B
    assert exporter_main(["build", "--model", "qwen2.5-0.5b", "--backend", "ort", "--weights", str(tiny_checkpoint),
                          "--out", str(tmp_path / "o")]) == 2
    assert "vocab_size=320, but qwen2.5-0.5b needs 151936" in _one_error_line(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert exporter_main(["build", "--model", str(tiny_checkpoint), "--backend", "ort", "--out", str(blocker / "b")]) == 2
    assert "cannot write to" in _one_error_line(capsys)
    # a folder that is not a bundle is never replaced
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert exporter_main(["build", "--model", str(tiny_checkpoint), "--backend", "ort", "--out", str(precious)]) == 2
    assert "is not a bundle; refusing to replace it" in _one_error_line(capsys)
    assert (precious / "notes.txt").read_text() == "mine"


def test_unreadable_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    assert exporter_main(["build", "--model", str(ckpt), "--backend", "ort", "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in _one_error_line(capsys)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert exporter_main(["build", "--model", str(ckpt), "--backend", "ort", "--out", str(tmp_path / "o")]) == 2
    assert "model_type 'mamba' is not supported" in _one_error_line(capsys)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert exporter_main(["build", "--model", str(ckpt), "--backend", "ort", "--out", str(tmp_path / "o")]) == 2
    assert "config.json lacks '" in _one_error_line(capsys)


def test_harness_rejects_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    assert harness_main(["verify", str(tmp_path)]) == 2
    assert "is not a bundle" in _one_error_line(capsys)


def test_module_entry_points_exit_2_without_traceback(tmp_path):
    for module in ("exporter", "runtime_harness"):
        argv = ["build", "--model", "nope", "--backend", "ort"] if module == "exporter" else ["verify", str(tmp_path)]
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_ci_runs_the_readme_commands():
    """CI must run exactly the README's set-up commands (the README is the truth about set-up)."""
    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    blocks = readme.split("## Set-up", 1)[1].split("## Commands", 1)[0].split("```bash\n")[1:]
    commands = [b.split("\n```", 1)[0].strip() for b in blocks]
    assert len(commands) == 2
    ci_lines = [line.strip() for line in ci.splitlines()]
    assert all(c in ci_lines for c in commands), commands
