"""Shared fixtures: pinned seeds and a tiny Qwen2 checkpoint saved by `transformers` itself."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/eager_backend.py

import exporter  # noqa: E402,F401  (quiets third-party import logs)
from helpers import make_hf_checkpoint, tiny_spec  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def hermetic_cache(tmp_path_factory):
    """Builds that use the default cache (the CLI, subprocesses) write to a session folder, never to the
    user's ~/.cache/ondevice-lora or $ONDEVICE_LORA_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONDEVICE_LORA_CACHE", str(tmp_path_factory.mktemp("ondevice-lora-cache")))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        yield


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer GQA Qwen2 with tied embeddings, saved with `save_pretrained` (safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    make_hf_checkpoint(tiny_spec(), folder, seed=0)
    return folder
