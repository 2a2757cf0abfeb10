"""Model and LoRA configuration: the one source of truth for shapes.

`ModelSpec` holds an architecture's numbers (the registry in `exporter.registry` writes them out
literally per model); `LoraConfig` holds every training setting. Derived sizes are properties.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

# LoRA target short names -> the Qwen2 decoder-layer module they adapt (Hugging Face names).
TARGET_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ALL_TARGETS: tuple[str, ...] = tuple(TARGET_MODULES)


@dataclass(frozen=True)
class ModelSpec:
    """A Qwen2-family decoder (tied embeddings, q/k/v bias, SwiGLU, RMSNorm, RoPE)."""

    name: str
    hf_repo: str | None
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = True
    model_type: str = "qwen2"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(out_features, in_features) of a target projection."""
        H, I, KV = self.hidden_size, self.intermediate_size, self.kv_dim
        return {
            "q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H),
            "gate": (I, H), "up": (I, H), "down": (H, I),
        }[target]

    def layer_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Frozen tensors of one decoder layer, by Hugging Face name relative to the layer."""
        shapes: dict[str, tuple[int, ...]] = {}
        for target, module in TARGET_MODULES.items():
            shapes[f"{module}.weight"] = self.linear_shape(target)
            if target in ("q", "k", "v"):
                shapes[f"{module}.bias"] = (self.linear_shape(target)[0],)
        shapes["input_layernorm.weight"] = (self.hidden_size,)
        shapes["post_attention_layernorm.weight"] = (self.hidden_size,)
        return shapes

    def num_parameters(self) -> int:
        """Total parameters: embedding + layers + final norm (+ an untied LM head)."""
        per_layer = sum(_numel(s) for s in self.layer_weight_shapes().values())
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + self.hidden_size + head

    def to_hf_config(self) -> dict:
        """The Hugging Face `config.json` fields of this architecture."""
        return {
            "model_type": self.model_type,
            "architectures": ["Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "use_sliding_window": False,
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA and step settings: y = x W0^T + (alpha / rank) (x A^T) B^T on each target."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    seq_len: int = 256
    batch: int = 1

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {', '.join(ALL_TARGETS)}")
        if not self.targets:
            raise ValueError("at least one LoRA target is needed")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha}")
        if self.seq_len <= 1:
            raise ValueError(f"sequence length must be at least 2, got {self.seq_len}")
        if self.batch <= 0:
            raise ValueError(f"batch must be positive, got {self.batch}")
        # Keep the canonical order so that equal configs compare (and hash) equal.
        object.__setattr__(self, "targets", tuple(t for t in ALL_TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(TARGET_MODULES[t] for t in self.targets)

    def layer_lora_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, int]]:
        """LoRA tensors of one layer: `<module>.lora_A` (r, in) and `<module>.lora_B` (out, r)."""
        shapes: dict[str, tuple[int, int]] = {}
        for target in self.targets:
            out_f, in_f = spec.linear_shape(target)
            module = TARGET_MODULES[target]
            shapes[f"{module}.lora_A"] = (self.rank, in_f)
            shapes[f"{module}.lora_B"] = (out_f, self.rank)
        return shapes

    def trainable_parameters(self, spec: ModelSpec) -> int:
        per_layer = sum(_numel(s) for s in self.layer_lora_shapes(spec).values())
        return spec.num_layers * per_layer

    def validate_for(self, spec: ModelSpec) -> None:
        """Refuse settings this architecture cannot train with (one line, ValueError)."""
        smallest = min(min(spec.linear_shape(t)) for t in self.targets)
        if self.rank > smallest:
            raise ValueError(f"LoRA rank {self.rank} is larger than the smallest adapted dimension ({smallest})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
