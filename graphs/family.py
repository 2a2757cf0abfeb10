"""The family seam: what a decoder layer of each architecture family is, as data.

A `Family` names the layer's frozen tensors beyond the seven projections (which projections carry a
bias, which RMSNorms exist and where), the norm style, the MLP activation and whether the embedding
is scaled. `graphs.layer` builds every family's forward and backward from these fields and the shared
ops in `graphs.ops`; the numbers (sizes, RoPE, windows) live in `graphs.config.ModelSpec`.

Norm roles (Hugging Face names relative to the layer in each family's module):
    attn_in   before attention                     (every family: input_layernorm)
    attn_out  on the attention output, pre-residual (Gemma-3: post_attention_layernorm)
    mlp_in    before the MLP                       (Qwen/Llama: post_attention_layernorm; Gemma-3: pre_feedforward_layernorm)
    mlp_out   on the MLP output, pre-residual       (Gemma-3: post_feedforward_layernorm)
    q, k      per head on q and k, before RoPE      (Qwen3, Gemma-3: self_attn.q_norm / k_norm, shape (head_dim,))

The per-family modules in `graphs/families/` hold the data and the family's `config.json` reading.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from graphs.config import ModelSpec

NORM_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out", "q", "k")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class Family:
    """One architecture family: the layer's structure as data.

    y = h1 + N_mlp_out(down(act(gate(m)) * up(m))),  m = N_mlp_in(h1),
    h1 = x + N_attn_out(o_proj(attention(RoPE(N_q(q)), RoPE(N_k(k)), v))),  q, k, v = proj(N_attn_in(x)),
    where an absent norm role is the identity and every norm is x * rsqrt(mean(x^2) + eps) * (w + norm_offset).
    """

    name: str
    hf_model_type: str  # model_type of the text model's config.json
    hf_architecture: str  # the transformers causal-LM class
    biases: tuple[str, ...]  # LoRA target short names whose projection has a bias
    norms: dict[str, str]  # norm role -> Hugging Face name relative to the layer
    norm_offset: float  # 0: RMSNorm weight used as w; 1: used as (1 + w) (Gemma)
    activation: str  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    scale_embedding: bool  # embedding output times sqrt(hidden) (Gemma), in the embedding's dtype
    hf_defaults: dict = field(default_factory=dict)  # the transformers config class defaults that matter
    read_hf_config: Callable[[dict], dict] | None = None  # config.json -> ModelSpec fields
    write_hf_config: Callable[["ModelSpec"], dict] | None = None  # ModelSpec -> config.json fields

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: unknown activation {self.activation!r}")
        unknown = set(self.norms) - set(NORM_ROLES)
        if unknown or "attn_in" not in self.norms or "mlp_in" not in self.norms:
            raise ValueError(f"{self.name}: norm roles must include attn_in and mlp_in, within {NORM_ROLES}")

    def norm(self, role: str) -> str | None:
        return self.norms.get(role)


def _registry() -> dict[str, Family]:
    from graphs.families import gemma3, llama, qwen2, qwen3

    return {f.name: f for f in (qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY, llama.FAMILY)}


_FAMILIES: dict[str, Family] | None = None


def families() -> dict[str, Family]:
    """Family name -> Family, for every supported family."""
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = _registry()
    return _FAMILIES


def get_family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise ValueError(f"unknown model family {name!r}; supported: {', '.join(fams)}")
    return fams[name]


def hf_config(spec: "ModelSpec") -> dict:
    """The Hugging Face `config.json` fields of `spec`'s text model (what its transformers class reads)."""
    return get_family(spec.family).write_hf_config(spec)


def family_of_model_type(model_type: str | None) -> Family | None:
    """The family whose checkpoints carry `model_type` (the text model's, or a multimodal wrapper's)."""
    for fam in families().values():
        if model_type == fam.hf_model_type or model_type in fam.hf_defaults.get("_wrapper_model_types", ()):
            return fam
    return None


def supported_model_types() -> tuple[str, ...]:
    out: list[str] = []
    for fam in families().values():
        out += [fam.hf_model_type, *fam.hf_defaults.get("_wrapper_model_types", ())]
    return tuple(out)


def spec_fields_from_hf_config(config: dict) -> dict:
    """ModelSpec keyword arguments (without name / hf_repo) from a `config.json` dict of any family.

    Raises ValueError (one line) for an unknown model_type or an unsupported feature, KeyError for a
    missing required field.
    """
    fam = family_of_model_type(config.get("model_type"))
    if fam is None:
        raise ValueError(f"model_type {config.get('model_type')!r} is not supported "
                         f"(supported: {', '.join(supported_model_types())})")
    return {"family": fam.name, **fam.read_hf_config(config)}


# ----------------------------------------------------------------------------- shared config.json reading

def read_rope(cfg: dict, default_theta: float) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling as RopeScaling fields or None) of a single-RoPE config, in either format:
    hub (`rope_theta`, `rope_scaling`) or transformers 5 (`rope_parameters` with rope_type / rope_theta)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        return float(params.get("rope_theta", cfg.get("rope_theta") or default_theta)), _scaling(params)
    theta = cfg.get("rope_theta")
    return float(theta if theta is not None else default_theta), _scaling(cfg.get("rope_scaling"))


def _scaling(d: dict | None) -> dict | None:
    """A rope_scaling / rope_parameters dict -> RopeScaling fields, or None for plain RoPE."""
    if not d:
        return None
    rope_type = d.get("rope_type") or d.get("type") or "default"
    if rope_type == "default":
        return None
    out = {"rope_type": rope_type, "factor": float(d["factor"])}
    if rope_type == "llama3":
        out.update(low_freq_factor=float(d["low_freq_factor"]), high_freq_factor=float(d["high_freq_factor"]),
                   original_max_position_embeddings=int(d["original_max_position_embeddings"]))
    elif rope_type != "linear":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (supported: linear, llama3)")
    return out


def scaling_to_hf(spec: "ModelSpec") -> dict | None:
    """`spec.rope_scaling` as a hub-format `rope_scaling` dict (None for plain RoPE)."""
    s = spec.rope_scaling
    if s is None:
        return None
    out = {"rope_type": s.rope_type, "factor": s.factor}
    if s.rope_type == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position_embeddings)
    return out


def common_fields(cfg: dict, defaults: dict) -> dict:
    """The sizes every family's config.json carries (defaults: the transformers class defaults)."""
    c = {**defaults, **cfg}
    heads = int(c["num_attention_heads"])
    return dict(
        vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c["head_dim"]) if c.get("head_dim") else None,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=int(c.get("max_position_embeddings") or 32768),
    )


def common_hf_fields(spec: "ModelSpec", fam: Family) -> dict:
    return {
        "model_type": spec.model_type,
        "architectures": [fam.hf_architecture],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
    }
