"""Shared fixtures: pinned seeds and a tiny Qwen2 checkpoint saved by `transformers` itself."""
from __future__ import annotations

import sys
from pathlib import Path

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
    """The tiny Qwen2 with its (tied) embedding scaled by 8 and a ChatML byte-level tokenizer beside it.

    At the 0.02 initialization the logits RMSNorm(x) E^T stay within about +-1.3, so no adapter can take
    the loss far below log(vocab); scaled, the model can learn a tiny chat set in a few dozen steps."""
    from helpers import make_chat_tokenizer

    folder = tmp_path_factory.mktemp("tiny-qwen2-chat")
    model = make_hf_checkpoint(tiny_spec(), folder, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    make_chat_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory, tiny_checkpoint):
    """family -> the tiny checkpoint of that family (tests/helpers.TINY_FAMILY_SPECS), saved by transformers
    with perturbed norms and biases; Qwen2's is `tiny_checkpoint`. Made once per session."""
    from helpers import TINY_FAMILY_SPECS

    made = {"qwen2": tiny_checkpoint}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"tiny-{family}")
            make_hf_checkpoint(TINY_FAMILY_SPECS[family], made[family], seed=0)
        return made[family]
    return get


@pytest.fixture(scope="session")
def tiny_bundles(family_checkpoint, tmp_path_factory):
    """(family, backend) -> that family's tiny checkpoint (no tokenizer: bytes) built for the backend,
    sequence 16, rank 4, SGD, vocabulary chunks of 128 rows; each built once per session."""
    from exporter.build import Reporter, build
    from exporter.cache import ArtifactCache
    from exporter.config import BuildConfig
    from graphs.config import LoraConfig

    built: dict[tuple[str, str], Path] = {}

    def get(family: str, backend: str) -> Path:
        if (family, backend) not in built:
            out = tmp_path_factory.mktemp("bundles") / f"tiny-{family}-{backend}"
            cache = ArtifactCache(tmp_path_factory.getbasetemp() / "artifact-cache")
            build(BuildConfig(model=str(family_checkpoint(family)), backend=backend, out=out,
                              lora=LoraConfig(rank=4, seq_len=16), vocab_chunk_rows=128), Reporter(progress=False), cache)
            built[family, backend] = out
        return built[family, backend]
    return get


@pytest.fixture(scope="session", params=runnable_backends())
def tiny_bundle(request, tiny_bundles) -> Path:
    """The tiny Qwen2 checkpoint built for each runtime (see `tiny_bundles`)."""
    return tiny_bundles("qwen2", request.param)
