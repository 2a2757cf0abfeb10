"""Qwen3 (`Qwen3ForCausalLM`): no biases, RMSNorm (w) per head on q and k before RoPE, explicit head_dim."""
from __future__ import annotations

from graphs.family import Family, common_fields, common_hf_fields, read_rope

HF_DEFAULTS = {"tie_word_embeddings": False, "rope_theta": 10000.0, "head_dim": 128}


def read(cfg: dict) -> dict:
    if cfg.get("use_sliding_window"):
        raise ValueError("Qwen3 sliding-window attention (use_sliding_window) is not supported")
    theta, scaling = read_rope(cfg, HF_DEFAULTS["rope_theta"])
    if scaling is not None:
        raise ValueError(f"RoPE scaling {scaling['rope_type']!r} is not supported for qwen3")
    return {**common_fields(cfg, HF_DEFAULTS), "rope_theta": theta}


def write(spec) -> dict:
    return {**common_hf_fields(spec, FAMILY), "hidden_act": "silu", "use_sliding_window": False,
            "attention_bias": False}


FAMILY = Family(
    name="qwen3", hf_model_type="qwen3", hf_architecture="Qwen3ForCausalLM",
    biases=(),
    norms={"attn_in": "input_layernorm.weight", "mlp_in": "post_attention_layernorm.weight",
           "q": "self_attn.q_norm.weight", "k": "self_attn.k_norm.weight"},
    norm_offset=0.0, activation="silu", scale_embedding=False,
    hf_defaults=HF_DEFAULTS, read_hf_config=read, write_hf_config=write,
)
