"""The model registry: every supported architecture, with its numbers written out.

Values are the models' published Hugging Face `config.json` files (for gemma-3-4b, the `text_config`
of the multimodal checkpoint plus transformers' Gemma3TextConfig defaults it relies on). A local
checkpoint folder or a Hugging Face repo id whose `config.json` has a supported `model_type` is read
into the same `ModelSpec` by `spec_from_hf_config` (both the hub format and transformers 5's).
"""
from __future__ import annotations

from graphs.config import FULL, SLIDING, ModelSpec, RopeScaling
from graphs.family import spec_fields_from_hf_config, supported_model_types


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """sliding_window_pattern 6: five sliding-window layers, then one full layer."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


LLAMA3_ROPE = RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)

MODELS: dict[str, ModelSpec] = {
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b", hf_repo="Qwen/Qwen2.5-0.5B", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    "qwen2.5-1.5b": ModelSpec(
        name="qwen2.5-1.5b", hf_repo="Qwen/Qwen2.5-1.5B", vocab_size=151936, hidden_size=1536,
        intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    "qwen2.5-3b": ModelSpec(
        name="qwen2.5-3b", hf_repo="Qwen/Qwen2.5-3B", vocab_size=151936, hidden_size=2048,
        intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
    "qwen3-0.6b": ModelSpec(
        name="qwen3-0.6b", hf_repo="Qwen/Qwen3-0.6B", family="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-1.7b": ModelSpec(
        name="qwen3-1.7b", hf_repo="Qwen/Qwen3-1.7B", family="qwen3", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
    "qwen3-4b": ModelSpec(
        name="qwen3-4b", hf_repo="Qwen/Qwen3-4B", family="qwen3", vocab_size=151936, hidden_size=2560,
        intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=40960,
    ),
    "gemma-3-1b": ModelSpec(
        name="gemma-3-1b", hf_repo="google/gemma-3-1b-pt", family="gemma3", vocab_size=262144, hidden_size=1152,
        intermediate_size=6912, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
        rope_theta=1000000.0, rope_local_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=_gemma3_layer_types(26), sliding_window=512, query_pre_attn_scalar=256,
        max_position_embeddings=32768,
    ),
    "gemma-3-4b": ModelSpec(  # the language model of Gemma3ForConditionalGeneration
        name="gemma-3-4b", hf_repo="google/gemma-3-4b-pt", family="gemma3", vocab_size=262208, hidden_size=2560,
        intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
        rope_theta=1000000.0, rope_scaling=RopeScaling(rope_type="linear", factor=8.0), rope_local_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, layer_types=_gemma3_layer_types(34), sliding_window=1024,
        query_pre_attn_scalar=256, max_position_embeddings=131072, checkpoint_prefix="language_model.model.",
    ),
    "llama-3.2-1b": ModelSpec(
        name="llama-3.2-1b", hf_repo="meta-llama/Llama-3.2-1B", family="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3.2-3b": ModelSpec(
        name="llama-3.2-3b", hf_repo="meta-llama/Llama-3.2-3B", family="llama", vocab_size=128256, hidden_size=3072,
        intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
}

SUPPORTED_MODEL_TYPES = supported_model_types()


class UnsupportedModel(ValueError):
    pass


# config.json sizes (of the text model) that must be positive integers when present
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim")


def spec_from_hf_config(config: dict, name: str, hf_repo: str | None) -> ModelSpec:
    """Read a Hugging Face `config.json` dict of a supported architecture into a ModelSpec.

    Both formats: as published on the hub (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
    `sliding_window_pattern`) and as transformers 5 writes it (`layer_types`, `rope_parameters`).
    Raises UnsupportedModel (one line) for anything else: not an object, another model_type, a missing
    field, or a number that is not a positive integer (e.g. zero heads)."""
    if not isinstance(config, dict):
        raise UnsupportedModel(f"{name}: config.json is not a JSON object")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in _POSITIVE_INTS:
        value = text.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UnsupportedModel(f"{name}: config.json: {key} must be a positive integer, got {value!r}")
    try:
        return ModelSpec(name=name, hf_repo=hf_repo, **spec_fields_from_hf_config(config))
    except UnsupportedModel:
        raise
    except KeyError as e:
        raise UnsupportedModel(f"{name}: config.json lacks {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:  # a field of the wrong type, or ModelSpec's own checks
        raise UnsupportedModel(f"{name}: config.json: {e}") from None
