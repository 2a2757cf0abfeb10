"""Shared fixtures: pinned seeds and a tiny Qwen2 checkpoint saved by `transformers` itself."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/eager_backend.py

import exporter  # noqa: E402,F401  (quiets third-party import logs)
from helpers import make_hf_checkpoint, tiny_spec  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer GQA Qwen2 with tied embeddings, saved with `save_pretrained` (safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    make_hf_checkpoint(tiny_spec(), folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint (same weights) with a ChatML byte-level tokenizer saved beside it."""
    from helpers import make_chat_tokenizer

    folder = tmp_path_factory.mktemp("tiny-qwen2-chat")
    make_hf_checkpoint(tiny_spec(), folder, seed=0)
    make_chat_tokenizer(folder)
    return folder
