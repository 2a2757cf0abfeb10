"""Shared fixtures: pinned seeds, tiny checkpoints saved by `transformers` itself, and tiny bundles.

The suite runs on two pytest-xdist workers (pyproject: `-n 2 --dist loadgroup`). Session artifacts
(checkpoints, bundles) are made once per run, not once per worker: `made_once` builds them in a folder
every worker sees, under a file lock. Modules whose own fixtures are costly stay on one worker (an
xdist group per module); the modules in `SPREAD`, which use only the shared artifacts, are spread test
by test over both workers.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/eager_backend.py

import exporter  # noqa: E402,F401  (quiets third-party import logs)
from helpers import make_hf_checkpoint, runnable_backends, tiny_spec  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def hermetic_cache(tmp_path_factory):
    """Builds that use the default cache (the CLI, subprocesses) write to a session folder, never to the
    user's ~/.cache/ondevice-lora or $ONDEVICE_LORA_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONDEVICE_LORA_CACHE", str(tmp_path_factory.mktemp("ondevice-lora-cache")))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        yield


SPREAD = {"test_family_bundles", "test_harness", "test_graphs_math", "test_whole_model", "test_quant"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_worker():
    """Two xdist workers share the two cores: one intra-op thread each (no oversubscription)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def restore_thread_setting():
    """`--threads` (a harness command run in-process) sets $ONDEVICE_LORA_THREADS and torch's thread count for
    the whole process: put both back after each test, so that a later ExecuTorch load in this worker asks
    for the threadpool size it was first loaded with (another size is refused: exporter.threads)."""
    from exporter.threads import ENV

    env, count = os.environ.get(ENV), torch.get_num_threads()
    yield
    if env is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = env
    torch.set_num_threads(count)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (the run's base temp); the session's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(path: Path, make: Callable[[Path], None]) -> Path:
    """`make(path)` unless another worker (or an earlier call) already made it; concurrent callers wait."""
    from filelock import FileLock

    done = path.with_name(path.name + ".done")
    with FileLock(str(path.with_name(path.name + ".lock"))):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a half-made one from an interrupted run
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(shared_dir) -> Path:
    """A 2-layer GQA Qwen2 with tied embeddings, saved with `save_pretrained` (safetensors)."""
    return made_once(shared_dir / "tiny-qwen2", lambda folder: make_hf_checkpoint(tiny_spec(), folder, seed=0))


@pytest.fixture(scope="session")
def chat_checkpoint(shared_dir) -> Path:
    """The tiny Qwen2 with its (tied) embedding scaled by 8 and a ChatML byte-level tokenizer beside it.

    At the 0.02 initialization the logits RMSNorm(x) E^T stay within about +-1.3, so no adapter can take
    the loss far below log(vocab); scaled, the model can learn a tiny chat set in a few dozen steps."""
    from helpers import make_chat_tokenizer

    def make(folder: Path) -> None:
        model = make_hf_checkpoint(tiny_spec(), folder, seed=0)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(8.0)
        model.save_pretrained(str(folder), safe_serialization=True)
        make_chat_tokenizer(folder)
    return made_once(shared_dir / "tiny-qwen2-chat", make)


@pytest.fixture(scope="session")
def family_checkpoint(shared_dir, tiny_checkpoint):
    """family -> the tiny checkpoint of that family (tests/helpers.TINY_FAMILY_SPECS), saved by transformers
    with perturbed norms and biases; Qwen2's is `tiny_checkpoint`. Made once per run."""
    from helpers import TINY_FAMILY_SPECS

    def get(family: str) -> Path:
        if family == "qwen2":
            return tiny_checkpoint
        return made_once(shared_dir / f"tiny-{family}",
                         lambda folder: make_hf_checkpoint(TINY_FAMILY_SPECS[family], folder, seed=0))
    return get


@pytest.fixture(scope="session")
def tiny_bundles(family_checkpoint, shared_dir):
    """(family, backend[, quant, group size, delegate]) -> that family's tiny checkpoint (no tokenizer: bytes)
    built for the backend, sequence 16, rank 4, SGD, vocabulary chunks of 128 rows; each built once per run.
    ExecuTorch bundles use the portable kernels (delegate "none": XNNPACK lowering is ~3.5x slower to build)
    unless `delegate="xnnpack"` (test_xnnpack.py). Tests read them; one that changes a bundle works on a copy."""
    from exporter.build import Reporter, build
    from exporter.cache import ArtifactCache
    from exporter.config import BuildConfig
    from graphs.config import LoraConfig

    def get(family: str, backend: str, quant: str = "none", group_size: int | None = None,
            delegate: str | None = None) -> Path:
        delegate = delegate or ("none" if backend == "executorch" else None)

        def make(out: Path) -> None:
            build(BuildConfig(model=str(family_checkpoint(family)), backend=backend, out=out,
                              lora=LoraConfig(rank=4, seq_len=16), vocab_chunk_rows=128, quant=quant,
                              quant_group_size=group_size, delegate=delegate), Reporter(progress=False),
                  ArtifactCache(shared_dir / "artifact-cache"))
        suffix = ("" if quant == "none" else f"-{quant}-g{group_size}") + \
            ("" if delegate in (None, "none") else f"-{delegate}")
        return made_once(shared_dir / f"tiny-{family}-{backend}{suffix}", make)
    return get


@pytest.fixture(scope="session", params=runnable_backends())
def tiny_bundle(request, tiny_bundles) -> Path:
    """The tiny Qwen2 checkpoint built for each runtime (see `tiny_bundles`)."""
    return tiny_bundles("qwen2", request.param)
