"""`BuildConfig`: every setting of one bundle build, built once from the CLI. Defaults live only here
(and, for LoRA settings, in `graphs.config.LoraConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from graphs.config import VOCAB_CHUNK_ROWS, LoraConfig


@dataclass(frozen=True)
class BuildConfig:
    model: str = "qwen2.5-0.5b"  # registry name, local checkpoint folder or Hugging Face repo id
    backend: str = "executorch"
    out: Path | None = None  # default: bundles/<model>-<backend>
    weights: str | None = None  # "random", a folder or a repo id; default: the model's own checkpoint
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: str = "sgd"
    method: str = "mesp"  # mesp: hand-derived structured backward; mebp: autodiff of the layer
    vocab_chunk_rows: int = VOCAB_CHUNK_ROWS  # embedding/LM-head rows per call (an upper bound)
    mlp_blocks: int | None = None  # MLP channel blocks in the structured layer graphs; None:
                                   # graphs.config.default_mlp_blocks (MLP_BLOCKS per 256 tokens)
    seed: int = 0  # random weights and the initial adapter
    quant: str = "none"  # frozen weights: none (float32, exact), int8 or int4 (graphs.quant)
    quant_group_size: int | None = None  # input columns per scale; None: the scheme's default
                                         # (graphs.quant.DEFAULT_GROUP_SIZE: int4 64, int8 0 = per row)
    delegate: str | None = None  # ExecuTorch only: xnnpack (matrix products through XNNPACK) or none (portable
                                 # kernels); None: the backend's default (DEFAULT_DELEGATE); refused elsewhere


# backend -> the delegates its programs can be lowered through, the first being the default
DELEGATES = {"executorch": ("xnnpack", "none")}
DEFAULT_DELEGATE = {backend: names[0] for backend, names in DELEGATES.items()}


def delegate_of(config: BuildConfig) -> str | None:
    """The delegate a build uses: the one asked for, else the backend's default (None: a backend without
    delegates)."""
    return config.delegate if config.delegate is not None else DEFAULT_DELEGATE.get(config.backend)


def default_out(model_name: str, backend: str) -> Path:
    safe = model_name.strip("/").replace("/", "--")
    return Path("bundles") / f"{safe}-{backend}"
