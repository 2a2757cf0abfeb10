"""Signals during a build: SIGTERM and SIGHUP clean up and exit (128 + signal) with the existing bundle intact;
after SIGKILL, the next build removes the staging folder the killed one left behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.cli import main as exporter_main
from test_bad_input import ort_bundle  # noqa: F401  (the session's tiny ONNX Runtime bundle)

FLAGS = ["--backend", "ort", "--seq-len", "16", "--lora-rank", "4", "--vocab-chunk-rows", "128"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _staging(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.staging-*"))


def _start_build(ckpt: Path, out: Path, cwd: Path) -> subprocess.Popen:
    """A build that takes a while (--no-cache: everything is traced and lowered)."""
    return subprocess.Popen([sys.executable, "-m", "exporter", "build", "--model", str(ckpt), *FLAGS, "--out", str(out),
                             "--no-cache", "--quiet"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_staging(proc: subprocess.Popen, parent: Path, timeout: float = 180) -> None:
    """Until the build has started writing (its staging folder holds weights), then a moment more."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        if any((s / "weights").exists() for s in _staging(parent)):
            time.sleep(1.0)
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the build never started writing")


@pytest.fixture
def existing(ort_bundle, tmp_path) -> Path:  # noqa: F811
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    shutil.copytree(ort_bundle, out)
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_and_keep_the_bundle(signum, tiny_checkpoint, existing, tmp_path):
    before = _tree(existing)
    proc = _start_build(tiny_checkpoint, existing, tmp_path)
    _wait_for_staging(proc, existing.parent)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"interrupted ({signal.Signals(signum).name}); nothing was written"
    assert "Traceback" not in err
    assert _staging(existing.parent) == []
    assert sorted(p.name for p in existing.parent.iterdir()) == ["bundle"]
    assert _tree(existing) == before


def test_after_sigkill_the_next_build_removes_the_staging_folder(tiny_checkpoint, existing, tmp_path, monkeypatch,
                                                                  tmp_path_factory):
    before = _tree(existing)
    proc = _start_build(tiny_checkpoint, existing, tmp_path)
    _wait_for_staging(proc, existing.parent)
    proc.kill()
    proc.communicate(timeout=60)
    stale = _staging(existing.parent)
    assert len(stale) == 1 and f"staging-{proc.pid}-" in stale[0].name
    assert _tree(existing) == before
    # a staging folder of a live build (this process) is left alone
    live = existing.parent / f".bundle.staging-{os.getpid()}-abc"
    live.mkdir()
    cache = tmp_path / "cache"
    shutil.copytree(tmp_path_factory.getbasetemp() / "artifact-cache", cache)
    monkeypatch.setenv("ONDEVICE_LORA_CACHE", str(cache))
    assert exporter_main(["build", "--model", str(tiny_checkpoint), *FLAGS, "--out", str(existing), "--quiet"]) == 0
    assert _staging(existing.parent) == [live]
    assert (existing / "manifest.json").is_file()


def test_a_bundle_moved_aside_by_a_killed_build_is_put_back(existing):
    """Killed between its two renames, a build leaves the old bundle at .<name>.old-<pid> and nothing at the output."""
    from exporter.outputs import remove_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = existing.parent / f".bundle.old-{int(dead.stdout)}"
    before = _tree(existing)
    existing.rename(aside)
    assert remove_stale(existing) == [aside]
    assert _tree(existing) == before and not aside.exists()


def test_a_published_bundle_has_ordinary_permissions(existing):
    """The staging folder comes from mkdtemp (private, 0700); the published bundle follows the umask."""
    from exporter.outputs import staging_dir

    umask = os.umask(0o022)
    try:
        stage = staging_dir(existing.parent / "new")
    finally:
        os.umask(umask)
    assert stage.stat().st_mode & 0o777 == 0o755
    shutil.rmtree(stage)
