"""The family seam's data against transformers: registry numbers, config.json reading (hub and
transformers-5 formats), RoPE frequencies, layer tensor names and shapes, and ModelSpec's checks.

References: the published config.json files (literal copies below, from the Hugging Face repos named
in exporter/registry.py), transformers' own config classes and rotary-embedding modules."""
from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch

from exporter.registry import MODELS, UnsupportedModel, spec_from_hf_config
from graphs import ops
from graphs.config import FULL, SLIDING, LoraConfig, ModelSpec
from graphs.family import families, get_family
from helpers import TINY_FAMILY_SPECS, hf_config_object

# config.json as published (fields that the spec reads; the rest of each file is omitted).
HUB_CONFIGS = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936},
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
        "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936},
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144},
    "gemma-3-4b": {  # Gemma3ForConditionalGeneration: the text model's fields beyond these are class defaults
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}},
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256},
    "llama-3.2-3b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 24, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256},
}


def _same_spec(a: ModelSpec, b: ModelSpec) -> None:
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("name"), d.pop("hf_repo")
    assert da == db


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_config_json_reads_into_the_registry_spec(name):
    _same_spec(spec_from_hf_config(HUB_CONFIGS[name], name, None), MODELS[name])


def _transformers5_dict(hub: dict) -> dict:
    """The config.json transformers 5 writes for `hub` (layer_types, rope_parameters)."""
    import transformers

    fields = {k: v for k, v in hub.items() if k not in ("architectures",)}
    config = transformers.AutoConfig.for_model(**fields)
    return json.loads(config.to_json_string())


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_transformers5_config_json_reads_into_the_registry_spec(name):
    cfg = _transformers5_dict(HUB_CONFIGS[name])
    text = cfg.get("text_config", cfg)
    assert "rope_parameters" in text and "rope_theta" not in text  # really the new format
    if name.startswith("gemma"):
        assert "layer_types" in text and "rope_local_base_freq" not in text
    _same_spec(spec_from_hf_config(cfg, name, None), MODELS[name])


@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
def test_spec_round_trips_through_its_own_hf_config(family):
    """to_hf_config -> transformers config class -> config.json -> spec_from_hf_config gives the spec back."""
    spec = TINY_FAMILY_SPECS[family]
    cfg = json.loads(hf_config_object(spec).to_json_string())
    _same_spec(spec_from_hf_config(cfg, spec.name, None), spec)
    _same_spec(ModelSpec(**json.loads(json.dumps(spec.to_dict()))), spec)  # the manifest's architecture


def test_gemma_layer_types_and_prefix():
    spec = MODELS["gemma-3-1b"]
    assert spec.layer_types.count(FULL) == 4 and spec.layer_types[5] == FULL and spec.layer_types[:5] == (SLIDING,) * 5
    assert spec.rope(SLIDING) == (10000.0, None) and spec.window(SLIDING) == 512 and spec.window(FULL) is None
    assert MODELS["gemma-3-4b"].rope(FULL)[1].factor == 8.0
    assert MODELS["gemma-3-4b"].checkpoint_prefix == "language_model.model."
    assert spec_from_hf_config(HUB_CONFIGS["gemma-3-4b"], "x", None).checkpoint_prefix == "language_model.model."
    assert spec.query_scale == 256 ** -0.5 and spec.q_dim == 1024 != spec.hidden_size


@pytest.mark.parametrize("config, message", [
    ({**HUB_CONFIGS["gemma-3-1b"], "final_logit_softcapping": 30.0}, "final_logit_softcapping is not supported"),
    ({**HUB_CONFIGS["llama-3.2-1b"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({**HUB_CONFIGS["qwen3-0.6b"], "use_sliding_window": True}, "sliding-window attention"),
    ({**HUB_CONFIGS["llama-3.2-1b"], "mlp_bias": True}, "mlp_bias is not supported"),
    ({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
    ({k: v for k, v in HUB_CONFIGS["qwen3-0.6b"].items() if k != "vocab_size"}, "config.json lacks 'vocab_size'"),
])
def test_unsupported_configs_are_refused_in_one_line(config, message):
    with pytest.raises(UnsupportedModel, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_from_hf_config(config, "m", None)


def _hf_inv_freq(spec: ModelSpec, kind: str) -> torch.Tensor:
    fam = get_family(spec.family)
    module = importlib.import_module(f"transformers.models.{fam.name}.modeling_{fam.name}")
    rotary = getattr(module, fam.hf_architecture.replace("ForCausalLM", "RotaryEmbedding"))(hf_config_object(spec))
    return getattr(rotary, f"{kind}_inv_freq") if hasattr(rotary, f"{kind}_inv_freq") else rotary.inv_freq


ROPE_CASES = [(name, kind) for name, spec in {**MODELS, **{f"tiny-{k}": v for k, v in TINY_FAMILY_SPECS.items()}}.items()
              for kind in spec.attention_kinds]


@pytest.mark.parametrize("name, kind", ROPE_CASES)
def test_rope_frequencies_match_transformers(name, kind):
    """inv_freq (reciprocal-free, host-computed) equals transformers' to float32 rounding; so do cos and sin."""
    spec = MODELS.get(name) or TINY_FAMILY_SPECS[name.removeprefix("tiny-")]
    theta, scaling = spec.rope(kind)
    ours, ref = ops.rope_inv_freq(spec.head_dim, theta, scaling), _hf_inv_freq(spec, kind)
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape
    # theta ** -e rounded once vs transformers' 1 / (theta ** e) rounded twice: at most 1 ulp (2^-23 = 1.2e-7);
    # llama3's smoothing (a difference of nearby terms) can widen that ulp to about 3
    ulps = 4 if scaling is not None and scaling.rope_type == "llama3" else 1
    assert ((ours - ref).abs() / ref.abs()).max().item() <= ulps * 2.0 ** -23
    S = 256
    cos, sin = ops.rope_cos_sin(S, spec.head_dim, theta, torch.float32, scaling)
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * ref[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    assert (cos - emb.cos()).abs().max().item() <= 1e-4 and (sin - emb.sin()).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(TINY_FAMILY_SPECS))
def test_layer_tensors_are_the_transformers_layer_tensors(family):
    """layer_weight_shapes names exactly the tensors of the family's transformers decoder layer, with their shapes."""
    import transformers

    spec = TINY_FAMILY_SPECS[family]
    model = getattr(transformers, get_family(family).hf_architecture)(hf_config_object(spec))
    ref = {k[len("model.layers.0."):]: tuple(v.shape) for k, v in model.state_dict().items()
           if k.startswith("model.layers.0.")}
    assert spec.layer_weight_shapes() == ref
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())


def test_linear_shapes_use_head_dim():
    spec = MODELS["qwen3-0.6b"]
    assert spec.linear_shape("q") == (2048, 1024) and spec.linear_shape("o") == (1024, 2048)
    assert spec.linear_shape("k") == spec.linear_shape("v") == (1024, 1024)
    assert LoraConfig().trainable_parameters(spec) == 5_046_272


def test_spec_checks():
    base = TINY_FAMILY_SPECS["gemma3"]
    with pytest.raises(ValueError, match="unknown model family"):
        dataclasses.replace(base, family="mamba")
    with pytest.raises(ValueError, match="give head_dim"):
        ModelSpec(name="x", hf_repo=None, vocab_size=10, hidden_size=50, intermediate_size=8, num_layers=1,
                  num_heads=4, num_kv_heads=2, rope_theta=1e4, rms_norm_eps=1e-6)
    with pytest.raises(ValueError, match="need a positive sliding_window"):
        dataclasses.replace(base, sliding_window=None)
    with pytest.raises(ValueError, match="layer_types for"):
        dataclasses.replace(base, layer_types=(SLIDING,))
    with pytest.raises(ValueError, match="mixes"):
        base.attention_kind()
    assert MODELS["qwen2.5-0.5b"].attention_kind() == FULL


def test_every_family_has_a_tiny_spec_and_a_registry_model():
    assert set(TINY_FAMILY_SPECS) == set(families())
    assert {spec.family for spec in MODELS.values()} == set(families())
