"""Model and LoRA configuration: the one source of truth for shapes.

`ModelSpec` holds an architecture's numbers (the registry in `exporter.registry` writes them out
literally per model); `LoraConfig` holds every training setting. Derived sizes are properties.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

# LoRA target short names -> the decoder-layer module they adapt (Hugging Face names, every family).
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

# Chunking defaults (the only place they are written): embedding / LM-head rows per call (an upper
# bound: `graphs.head.vocab_chunks` balances the chunks), MLP channel blocks in the structured layer graphs
# (MLP_BLOCKS per MLP_BLOCK_TOKENS tokens, so that a block's (tokens, channels) tensors keep their size as
# the sequence grows) and queries per attention block in the structured (mesp) layer graphs.
VOCAB_CHUNK_ROWS = 8192
MLP_BLOCKS = 4
MLP_BLOCK_TOKENS = 256
ATTENTION_QUERY_ROWS = 128


MLP_BLOCK_BYTES = 16 * 2**20  # at most this much of float32 gate + up + down weights per MLP block


def default_mlp_blocks(tokens: int, spec: "ModelSpec | None" = None) -> int:
    """MLP_BLOCKS per started MLP_BLOCK_TOKENS tokens of one step (batch x sequence): 4 at 256, 16 at 1024; and
    enough blocks that one holds at most MLP_BLOCK_BYTES of (dequantized) weights: 4 for Qwen2.5-0.5B (52 MB of
    MLP weights), 17 for Qwen2.5-3B (270 MB). A split bundle rounds up to equal blocks
    (`StepShapes.mlp_block_rows`)."""
    by_tokens = MLP_BLOCKS * max(1, -(-tokens // MLP_BLOCK_TOKENS))
    if spec is None:
        return by_tokens
    return max(by_tokens, -(-3 * spec.intermediate_size * spec.hidden_size * 4 // MLP_BLOCK_BYTES))


FULL, SLIDING = "full_attention", "sliding_attention"  # per-layer attention kinds (transformers' names)
ATTENTION_KINDS: tuple[str, ...] = (FULL, SLIDING)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency rescaling of the full-attention layers (Hugging Face `rope_scaling`).

    linear (Gemma-3-4b): inv_freq / factor.
    llama3 (Llama-3.2): inv_freq / factor for wavelengths above original_max / low_freq_factor, unchanged
    below original_max / high_freq_factor, smoothly interpolated between.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"RoPE scaling {self.rope_type!r} is not supported (supported: linear, llama3)")
        if self.rope_type == "llama3" and None in (self.low_freq_factor, self.high_freq_factor,
                                                   self.original_max_position_embeddings):
            raise ValueError("llama3 RoPE scaling needs low_freq_factor, high_freq_factor and "
                             "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only LM of one of the families in `graphs.family` (tied or untied head, RMSNorm, RoPE, GLU MLP).

    The family (`graphs.family.FAMILIES[family]`) says what a layer is (biases, norms, activation); the
    spec holds the numbers. Optional fields default to the Qwen2 case: head_dim = hidden / heads, every
    layer full attention, plain RoPE with base `rope_theta`, query scale head_dim ** -0.5.
    """

    name: str
    hf_repo: str | None
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float  # RoPE base of the full-attention layers
    rms_norm_eps: float
    tie_word_embeddings: bool = True
    model_type: str | None = None  # Hugging Face model_type of the text model; None: the family's
    family: str = "qwen2"
    head_dim: int | None = None  # None: hidden_size // num_heads
    layer_types: tuple[str, ...] | None = None  # per layer FULL or SLIDING; None: all FULL
    rope_scaling: RopeScaling | None = None  # of the full-attention layers
    sliding_window: int | None = None  # key positions a sliding layer sees: i - window < j <= i
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (no scaling)
    query_pre_attn_scalar: int | None = None  # query scale = this ** -0.5; None: head_dim
    max_position_embeddings: int = 32768
    checkpoint_prefix: str = "model."  # where the text model's tensors sit in the published checkpoint

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key} must be a positive finite number, got {value!r}")
        from graphs.family import get_family

        fam = get_family(self.family)  # raises on an unknown family
        if self.model_type is None:
            object.__setattr__(self, "model_type", fam.hf_model_type)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                                 f"give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        types = tuple(self.layer_types) if self.layer_types is not None else (FULL,) * self.num_layers
        object.__setattr__(self, "layer_types", types)
        if len(types) != self.num_layers:
            raise ValueError(f"{len(types)} layer_types for {self.num_layers} layers")
        unknown = sorted(set(types) - set(ATTENTION_KINDS))
        if unknown:
            raise ValueError(f"unknown layer type(s) {unknown}; supported: {', '.join(ATTENTION_KINDS)}")
        if SLIDING in types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError("sliding-attention layers need a positive sliding_window")
        if isinstance(self.rope_scaling, dict):  # from to_dict() / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def query_scale(self) -> float:
        """Attention logits are (q . k) * query_scale."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The distinct layer types, in ATTENTION_KINDS order (one layer graph per kind)."""
        return tuple(k for k in ATTENTION_KINDS if k in self.layer_types)

    def attention_kind(self, kind: str | None = None) -> str:
        """`kind` checked, or the spec's only kind when None (an error when layers differ)."""
        if kind is None:
            if len(self.attention_kinds) != 1:
                raise ValueError(f"{self.name} mixes {', '.join(self.attention_kinds)} layers; say which")
            return self.attention_kinds[0]
        if kind not in self.layer_types:
            raise ValueError(f"{self.name} has no {kind!r} layers")
        return kind

    def rope(self, kind: str) -> tuple[float, RopeScaling | None]:
        """(base, scaling) of the RoPE that layers of attention kind `kind` use."""
        if kind == SLIDING:
            return (self.rope_local_theta or self.rope_theta), None
        return self.rope_theta, self.rope_scaling

    def window(self, kind: str) -> int | None:
        """The sliding window of layers of kind `kind` (None: causal over the whole sequence)."""
        return self.sliding_window if kind == SLIDING else None

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(out_features, in_features) of a target projection."""
        H, I, Q, KV = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {
            "q": (Q, H), "k": (KV, H), "v": (KV, H), "o": (H, Q),
            "gate": (I, H), "up": (I, H), "down": (H, I),
        }[target]

    def layer_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Frozen tensors of one decoder layer, by Hugging Face name relative to the layer."""
        from graphs.family import get_family

        fam = get_family(self.family)
        shapes: dict[str, tuple[int, ...]] = {}
        for target, module in TARGET_MODULES.items():
            shapes[f"{module}.weight"] = self.linear_shape(target)
            if target in fam.biases:
                shapes[f"{module}.bias"] = (self.linear_shape(target)[0],)
        for role, name in fam.norms.items():
            shapes[name] = (self.head_dim,) if role in ("q", "k") else (self.hidden_size,)
        return shapes

    def num_parameters(self) -> int:
        """Total parameters: embedding + layers + final norm (+ an untied LM head)."""
        per_layer = sum(_numel(s) for s in self.layer_weight_shapes().values())
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + self.hidden_size + head

    def to_hf_config(self) -> dict:
        """The Hugging Face `config.json` fields of this architecture (the text model's)."""
        from graphs.family import hf_config

        return hf_config(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


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
