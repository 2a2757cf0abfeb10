"""The model registry: every supported architecture, with its numbers written out.

Values are the models' published Hugging Face `config.json` files. A local checkpoint folder or a
Hugging Face repo id whose `config.json` has a supported `model_type` is read into the same
`ModelSpec` by `spec_from_hf_config`.
"""
from __future__ import annotations

from graphs.config import ModelSpec

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
}

SUPPORTED_MODEL_TYPES = ("qwen2",)


class UnsupportedModel(ValueError):
    pass


def spec_from_hf_config(config: dict, name: str, hf_repo: str | None) -> ModelSpec:
    """Read a Hugging Face `config.json` dict of a supported architecture into a ModelSpec.

    Raises UnsupportedModel (one line) for anything else: not an object, another model_type, a missing
    field, or a number that is not a positive integer (e.g. zero heads)."""
    if not isinstance(config, dict):
        raise UnsupportedModel(f"{name}: config.json is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        hidden, heads = _positive_int(config, "hidden_size"), _positive_int(config, "num_attention_heads")
        head_dim = int(config.get("head_dim") or hidden // heads)
        if head_dim * heads != hidden:
            raise UnsupportedModel(f"{name}: head_dim * num_attention_heads != hidden_size is not supported")
        if config.get("use_sliding_window"):
            raise UnsupportedModel(f"{name}: sliding-window attention is not supported")
        return ModelSpec(
            name=name, hf_repo=hf_repo, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
            rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except UnsupportedModel:
        raise
    except KeyError as e:
        raise UnsupportedModel(f"{name}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, or ModelSpec's own checks
        raise UnsupportedModel(f"{name}: config.json: {e}") from None


def _positive_int(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value
