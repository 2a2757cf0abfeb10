"""Outputs that never lose a user's file and leave nothing half-written: symlinked and existing output folders,
a full disk, a broken cache entry, train runs (overwrite, Ctrl-C), progress off a terminal, warnings, --help."""
from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path

import pytest

from exporter.cli import main as exporter_main
from exporter.cli import parser as exporter_parser
from exporter.config import DEFAULT_DELEGATE, BuildConfig
from graphs.config import MLP_BLOCK_BYTES, MLP_BLOCK_TOKENS, MLP_BLOCKS
from graphs.config import LoraConfig
from runtime_harness.cli import main as harness_main
from runtime_harness.cli import parser as harness_parser
from test_bad_input import ort_bundle  # noqa: F401  (the session's tiny ONNX Runtime bundle)

FLAGS = ["--backend", "ort", "--seq-len", "16", "--lora-rank", "4", "--vocab-chunk-rows", "128"]


@pytest.fixture
def cache_copy(ort_bundle, tmp_path_factory, tmp_path, monkeypatch) -> Path:  # noqa: F811
    """A private copy of the session's build cache (so that a build of the tiny bundle is quick)."""
    cache = tmp_path / "cache"
    shutil.copytree(tmp_path_factory.getbasetemp() / "artifact-cache", cache)
    monkeypatch.setenv("ONDEVICE_LORA_CACHE", str(cache))
    return cache


def _build(ckpt: Path, out: Path | str, *extra: str) -> int:
    return exporter_main(["build", "--model", str(ckpt), *FLAGS, "--out", str(out), "--quiet", *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_symlinked_out_is_written_through_the_link(tiny_checkpoint, cache_copy, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _build(tiny_checkpoint, link) == 0
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "link", "real"]  # no stray link or staging
    assert _build(tiny_checkpoint, link) == 0  # a rebuild replaces the bundle behind the link
    assert link.is_symlink() and (target / "manifest.json").is_file()
    # a link to a folder that is not a bundle is refused, and the folder kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (tmp_path / "link2").symlink_to(mine)
    capsys.readouterr()
    assert _build(tiny_checkpoint, tmp_path / "link2") == 2
    assert "is not a bundle; refusing" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine"


def test_full_disk_keeps_the_old_bundle_and_leaves_nothing(tiny_checkpoint, cache_copy, tmp_path, capsys,
                                                           monkeypatch):
    import exporter.build as build_mod

    out = tmp_path / "bundle"
    assert _build(tiny_checkpoint, out) == 0
    before = _tree(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_mod, "save_file", full)
    capsys.readouterr()
    assert _build(tiny_checkpoint, out, "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0]
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "cache"]


def test_broken_cache_entry_is_rebuilt(tiny_checkpoint, cache_copy, tmp_path, capsys):
    """An entry whose metadata is unreadable or names a missing file is discarded and rebuilt, and says so."""
    broken = sorted(cache_copy.rglob("lowered.json"))
    assert broken
    for meta in broken:
        meta.write_text("{not json")
    capsys.readouterr()
    assert _build(tiny_checkpoint, tmp_path / "b") == 0
    assert "were rebuilt" in capsys.readouterr().err
    for meta in sorted(cache_copy.rglob("lowered.json")):  # a missing graph file of an entry
        meta.write_text(json.dumps([{"file": "graphs/nothing.onnx"}]))
    capsys.readouterr()
    assert _build(tiny_checkpoint, tmp_path / "c") == 0
    assert "were rebuilt" in capsys.readouterr().err


def test_unremovable_broken_cache_entry_names_no_cache(tiny_checkpoint, cache_copy, tmp_path, capsys, monkeypatch):
    import exporter.cache as cache_mod

    for meta in sorted(cache_copy.rglob("lowered.json")):
        meta.write_text("{not json")
    monkeypatch.setattr(cache_mod.shutil, "rmtree", lambda *a, **k: None)  # the entry cannot be removed
    assert _build(tiny_checkpoint, tmp_path / "b") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is broken" in err[0] and "--no-cache" in err[0]
    assert not (tmp_path / "b").exists()


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 4)
    return p


def test_train_overwrite_replaces_an_earlier_run(ort_bundle, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = ["train", str(ort_bundle), "--data", str(_text(tmp_path)), "--steps", "2", "--out", str(out)]
    assert harness_main(argv) == 0
    first = (out / "loss.csv").read_text()
    assert harness_main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "loss.csv").read_text() == first
    assert harness_main([*argv[:-4], "--steps", "3", "--out", str(out), "--overwrite"]) == 0
    assert len((out / "loss.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize("stop_at", [0, 2])
def test_train_ctrl_c_saves_the_completed_steps_or_says_nothing_was_saved(ort_bundle, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch, stop_at):
    from exporter.adapter import read_adapter
    from runtime_harness.runner import BundleRunner

    real_step, calls = BundleRunner.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > stop_at:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(BundleRunner, "step", step)
    out = tmp_path / "run"
    code = harness_main(["train", str(ort_bundle), "--data", str(_text(tmp_path)), "--steps", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130
    if stop_at == 0:
        assert "nothing was saved" in err and not out.exists()
    else:
        assert "interrupted after 2 of 5 steps; saved" in err
        assert len((out / "loss.csv").read_text().splitlines()) == 3
        _, tensors = read_adapter(out / "adapter")
        assert tensors


def test_progress_goes_to_logs_off_a_terminal(ort_bundle, tiny_checkpoint, cache_copy, tmp_path, capsys,  # noqa: F811
                                              monkeypatch):
    import exporter.progress as progress

    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)
    assert harness_main(["train", str(ort_bundle), "--data", str(_text(tmp_path)), "--steps", "3", "--out",
                         str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "train: 1/3 steps" in err and "train: 3/3 steps" in err and "loss=" in err
    assert exporter_main(["build", "--model", str(tiny_checkpoint), *FLAGS, "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "weights: 2/2 layers" in err and "graphs: 4/4 programs" in err
    assert "\r" not in err  # no bar in a log
    assert _build(tiny_checkpoint, tmp_path / "b") == 0
    assert capsys.readouterr().err == ""  # --quiet


def test_warnings_are_single_lines_above_the_bars(capsys):
    import logging

    from exporter.progress import routed_warnings

    with routed_warnings():
        for _ in range(3):
            warnings.warn("a third-party notice\nwith a second line", UserWarning)
        logging.getLogger("somelib").warning("a log record")
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: a third-party notice", "warning: a log record"]


def _helps(p, command: str) -> dict[str, str]:
    """Option -> its help text, as --help prints it (%(default)s filled in)."""
    sub = next(a for a in p._actions if a.dest == "command").choices[command]
    formatter = sub._get_formatter()
    return {o: formatter._expand_help(a) if a.help else "" for a in sub._actions for o in a.option_strings}


def test_help_shows_every_default_from_the_config_dataclasses():
    b, lora = BuildConfig(), LoraConfig()
    helps = _helps(exporter_parser(), "build")
    for flag, value in [("--seq-len", lora.seq_len), ("--lora-rank", lora.rank), ("--lora-alpha", f"{lora.alpha:g}"),
                        ("--lora-targets", ",".join(lora.targets)), ("--optimizer", b.optimizer),
                        ("--method", b.method), ("--vocab-chunk-rows", b.vocab_chunk_rows),
                        ("--mlp-blocks", f"{MLP_BLOCKS} per {MLP_BLOCK_TOKENS} tokens, and one per "
                                         f"{MLP_BLOCK_BYTES // 2**20} MiB of float32 MLP weights"), ("--seed", b.seed),
                        ("--delegate", DEFAULT_DELEGATE["executorch"])]:
        assert f"(default: {value})" in helps[flag], (flag, helps[flag])
    assert all(helps[f] for f in helps), [f for f in helps if not helps[f]]
    from runtime_harness.train import DEFAULT_LR

    for command, defaults in [("train", {"--seed": 0, "--lr": f"{DEFAULT_LR['sgd']:g} for sgd"}),
                              ("verify", {"--seed": 0}),
                              ("bench", {"--steps": 3, "--seq-len": 256, "--convergence-steps": 150})]:
        helps = _helps(harness_parser(), command)
        assert all(helps[f] for f in helps), command
        for flag, value in defaults.items():
            assert f"default: {value}" in helps[flag], (command, flag, helps[flag])


def test_train_on_a_full_disk_is_one_line_and_leaves_no_folder(ort_bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    import runtime_harness.train as train_mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_mod, "plot_losses", full)
    out = tmp_path / "run"
    assert harness_main(["train", str(ort_bundle), "--data", str(_text(tmp_path)), "--steps", "1", "--out",
                         str(out)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("train: ")]
    assert len(err) == 1 and err[0].startswith("error: ") and "No space left on device" in err[0]
    assert not out.exists()
