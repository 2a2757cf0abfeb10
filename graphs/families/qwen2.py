"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v biases, two RMSNorms (w), SwiGLU, plain RoPE."""
from __future__ import annotations

from graphs.family import Family, common_fields, common_hf_fields, read_rope

HF_DEFAULTS = {"tie_word_embeddings": False, "rope_theta": 10000.0}


def read(cfg: dict) -> dict:
    if cfg.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window) is not supported")
    theta, scaling = read_rope(cfg, HF_DEFAULTS["rope_theta"])
    if scaling is not None:
        raise ValueError(f"RoPE scaling {scaling['rope_type']!r} is not supported for qwen2")
    return {**common_fields(cfg, HF_DEFAULTS), "rope_theta": theta}


def write(spec) -> dict:
    return {**common_hf_fields(spec, FAMILY), "hidden_act": "silu", "use_sliding_window": False}


FAMILY = Family(
    name="qwen2", hf_model_type="qwen2", hf_architecture="Qwen2ForCausalLM",
    biases=("q", "k", "v"),
    norms={"attn_in": "input_layernorm.weight", "mlp_in": "post_attention_layernorm.weight"},
    norm_offset=0.0, activation="silu", scale_embedding=False,
    hf_defaults=HF_DEFAULTS, read_hf_config=read, write_hf_config=write,
)
