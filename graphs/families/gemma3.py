"""Gemma 3 text (`Gemma3ForCausalLM`; the language model of `Gemma3ForConditionalGeneration`).

No biases; four RMSNorms per layer plus q/k norms, all used as (1 + w); GeGLU (gelu tanh); embedding
times sqrt(hidden); query scale query_pre_attn_scalar ** -0.5; sliding-window layers (own RoPE base,
`rope_local_base_freq`) interleaved with full layers (`rope_theta`, optional `rope_scaling`) by
`sliding_window_pattern` (every pattern-th layer is full) or an explicit `layer_types`.
"""
from __future__ import annotations

from graphs.family import Family, common_fields, common_hf_fields, read_rope, scaling_to_hf, _scaling

# transformers' Gemma3TextConfig defaults (the 4b checkpoint's text_config leaves most fields at these).
HF_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "max_position_embeddings": 131072, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "_wrapper_model_types": ("gemma3",),  # Gemma3ForConditionalGeneration: text part under text_config
}
WRAPPER_PREFIX = "language_model.model."  # the text model's tensors in a Gemma3ForConditionalGeneration checkpoint


def read(cfg: dict) -> dict:
    prefix = "model."
    if cfg.get("model_type") == "gemma3":  # multimodal wrapper: the text model's config is nested
        top_tie = cfg.get("tie_word_embeddings")
        cfg = dict(cfg.get("text_config") or {})
        if top_tie is not None and "tie_word_embeddings" not in cfg:
            cfg["tie_word_embeddings"] = top_tie
        prefix = WRAPPER_PREFIX
    c = {**HF_DEFAULTS, **cfg}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(key) is not None:
            raise ValueError(f"Gemma {key} is not supported")
    if c.get("use_bidirectional_attention"):
        raise ValueError("Gemma bidirectional attention is not supported")
    fields = common_fields(cfg, HF_DEFAULTS)
    n = fields["num_layers"]
    if c.get("layer_types"):
        layer_types = tuple(c["layer_types"])
    else:
        pattern = int(c["sliding_window_pattern"])
        layer_types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))
    params = c.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        theta = float(full.get("rope_theta", c["rope_theta"]))
        scaling = _scaling(full)
        local_theta = float(local.get("rope_theta", c["rope_local_base_freq"]))
        if _scaling(local) is not None:
            raise ValueError("RoPE scaling on Gemma sliding layers is not supported")
    else:
        theta, scaling = read_rope(c, HF_DEFAULTS["rope_theta"])
        local_theta = float(c["rope_local_base_freq"])
    return {**fields, "rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local_theta,
            "layer_types": layer_types, "sliding_window": int(c["sliding_window"]),
            "query_pre_attn_scalar": int(c["query_pre_attn_scalar"]), "checkpoint_prefix": prefix}


def write(spec) -> dict:
    """transformers-5 format (`layer_types`, `rope_parameters` per layer type) for Gemma3TextConfig."""
    full = {"rope_type": "default", "rope_theta": spec.rope_theta, **(scaling_to_hf(spec) or {})}
    out = {**common_hf_fields(spec, FAMILY), "hidden_activation": "gelu_pytorch_tanh",
           "layer_types": list(spec.layer_types), "sliding_window": spec.sliding_window,
           "query_pre_attn_scalar": spec.query_pre_attn_scalar or spec.head_dim,
           "rope_parameters": {"full_attention": full,
                               "sliding_attention": {"rope_type": "default",
                                                     "rope_theta": spec.rope_local_theta or spec.rope_theta}},
           "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False}
    del out["rope_theta"]
    return out


FAMILY = Family(
    name="gemma3", hf_model_type="gemma3_text", hf_architecture="Gemma3ForCausalLM",
    biases=(),
    norms={"attn_in": "input_layernorm.weight", "attn_out": "post_attention_layernorm.weight",
           "mlp_in": "pre_feedforward_layernorm.weight", "mlp_out": "post_feedforward_layernorm.weight",
           "q": "self_attn.q_norm.weight", "k": "self_attn.k_norm.weight"},
    norm_offset=1.0, activation="gelu_tanh", scale_embedding=True,
    hf_defaults=HF_DEFAULTS, read_hf_config=read, write_hf_config=write,
)
