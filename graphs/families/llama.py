"""Llama 3.x (`LlamaForCausalLM`): no biases, two RMSNorms (w), SwiGLU, RoPE with llama3 frequency scaling."""
from __future__ import annotations

from graphs.family import Family, common_fields, common_hf_fields, read_rope, scaling_to_hf

HF_DEFAULTS = {"tie_word_embeddings": False, "rope_theta": 10000.0}


def read(cfg: dict) -> dict:
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama attention_bias / mlp_bias is not supported")
    theta, scaling = read_rope(cfg, HF_DEFAULTS["rope_theta"])
    return {**common_fields(cfg, HF_DEFAULTS), "rope_theta": theta, "rope_scaling": scaling}


def write(spec) -> dict:
    return {**common_hf_fields(spec, FAMILY), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_scaling": scaling_to_hf(spec)}


FAMILY = Family(
    name="llama", hf_model_type="llama", hf_architecture="LlamaForCausalLM",
    biases=(),
    norms={"attn_in": "input_layernorm.weight", "mlp_in": "post_attention_layernorm.weight"},
    norm_offset=0.0, activation="silu", scale_embedding=False,
    hf_defaults=HF_DEFAULTS, read_hf_config=read, write_hf_config=write,
)
