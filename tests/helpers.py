"""Helpers shared by the tests: the tiny architecture, random tensors, and real HF checkpoints.

Everything here is deterministic given `torch.manual_seed` (the autouse `seed` fixture pins it to 0).
Layer tensors use the names of `ModelSpec.layer_weight_shapes` / `LoraConfig.layer_lora_shapes`
(Hugging Face names relative to the layer, e.g. `self_attn.q_proj.weight`, `mlp.up_proj.lora_A`).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from graphs.config import FULL, SLIDING, LoraConfig, ModelSpec, RopeScaling
from graphs.family import families, get_family


def tiny_spec(**overrides) -> ModelSpec:
    """2 layers, 4 heads over 2 kv heads (GQA), tied embeddings, vocab 320 (>= 256 for byte-level text)."""
    fields = dict(name="tiny-qwen2", hf_repo=None, vocab_size=320, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6)
    fields.update(overrides)
    return ModelSpec(**fields)


# A tiny spec of each family that exercises what makes the family different: explicit head_dim with
# heads x head_dim != hidden (qwen3, gemma3), llama3 RoPE whose three frequency bands are all populated
# (llama: wavelengths 6 .. 20000 against original context 256), a sliding window (5) shorter than the
# test sequences with a distinct local RoPE base, linear RoPE scaling on the full layer and a query
# scalar different from head_dim (gemma3).
TINY_FAMILY_SPECS: dict[str, ModelSpec] = {
    "qwen2": tiny_spec(),
    "qwen3": tiny_spec(name="tiny-qwen3", family="qwen3", head_dim=24, rms_norm_eps=1e-6),
    "llama": tiny_spec(name="tiny-llama", family="llama", head_dim=16, rms_norm_eps=1e-5,
                       rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=256)),
    "gemma3": tiny_spec(name="tiny-gemma3", family="gemma3", hidden_size=48, head_dim=16, num_layers=2,
                        layer_types=(SLIDING, FULL), sliding_window=5, rope_local_theta=100.0,
                        rope_scaling=RopeScaling("linear", factor=4.0), query_pre_attn_scalar=20),
}
assert set(TINY_FAMILY_SPECS) == set(families()), "every family needs a tiny spec (and so gets every test)"


def random_layer_weights(spec: ModelSpec, dtype=torch.float64, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Frozen tensors of one layer; effective norm weights around 1 (w ~ 1, or w ~ 0 for (1 + w) norms),
    never exactly 1, so that every RMSNorm's weight matters."""
    fam = get_family(spec.family)
    norms = set(fam.norms.values())
    out = {}
    for name, shape in spec.layer_weight_shapes().items():
        t = torch.randn(shape, dtype=dtype) * scale
        out[name] = (1.0 - fam.norm_offset) + t if name in norms else t
    return out


def random_lora(spec: ModelSpec, lora: LoraConfig, dtype=torch.float64, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """NONZERO LoRA A and B (B = 0, PEFT's default, would hide every bug in dA)."""
    return {n: torch.randn(s, dtype=dtype) * scale for n, s in lora.layer_lora_shapes(spec).items()}


def hf_config_object(spec: ModelSpec):
    """The transformers config object of `spec` (its family's config class), eager attention, float32."""
    import transformers

    fields = {k: v for k, v in spec.to_hf_config().items() if k not in ("architectures",)}
    config = transformers.AutoConfig.for_model(**fields, dtype="float32", attn_implementation="eager")
    config._attn_implementation = "eager"  # older transformers ignore the constructor argument
    return config


def make_hf_checkpoint(spec: ModelSpec, folder: Path, seed: int = 0, init_std: float | None = None):
    """A real transformers causal LM of `spec` (its family's class, e.g. `Qwen2ForCausalLM`; float32, eager
    attention), saved to `folder` with `save_pretrained` (safetensors); returns the model, in eval mode.

    Biases and norm weights are perturbed away from their zero / one initialization, so that a test
    which loads them wrongly (or forgets them) fails. `init_std` (default: transformers' 0.02) larger
    makes attention far from uniform, so that positions (RoPE, masks) change the loss visibly.
    """
    import transformers

    torch.manual_seed(seed)
    config = hf_config_object(spec)
    if init_std is not None:
        config.initializer_range = init_std
    model_class = getattr(transformers, get_family(spec.family).hf_architecture)
    model = model_class(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


_RUNTIME_MODULES = {"executorch": "executorch.runtime", "ort": "onnxruntime", "coreml": "coremltools"}


def runnable_backends(weights_as_inputs: bool = False) -> list:
    """Every backend in the registry as a pytest param; one whose runtime is not installed is skipped with
    the reason. Core ML runs everywhere: the framework on macOS, the NumPy MIL interpreter elsewhere.
    `weights_as_inputs`: only backends whose layer program takes the frozen weights as inputs (Core ML
    bakes them into per-layer packages; test_backend_coreml.py compares those with eager)."""
    import importlib.util

    import pytest

    from exporter.backends import BACKEND_NAMES, get_backend

    params = []
    for name in BACKEND_NAMES:
        module = _RUNTIME_MODULES.get(name, name)
        if importlib.util.find_spec(module.split(".")[0]) is None:
            reason = f"the {name} runtime ({module}) is not installed"
        elif weights_as_inputs and get_backend(name).weights_in_graphs:
            reason = f"{name} bakes the frozen weights into per-layer programs (see test_backend_coreml.py)"
        else:
            reason = None
        params.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return params


@contextmanager
def torch_threads(n: int):
    """Run the block with `torch.set_num_threads(n)`, then restore the previous count.

    Tiny-tensor tests are dominated by OpenMP synchronisation; one thread makes them many times faster
    (and their timing independent of whatever else runs on the machine's cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 256, 257, 258


def make_chat_tokenizer(folder: Path, chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer without merges (ids 0..255 = the UTF-8 bytes) plus ChatML's special
    tokens (256 <|endoftext|> = pad, 257 <|im_start|>, 258 <|im_end|> = eos): 259 tokens, which fits the
    tiny model's vocabulary of 320. Built with `tokenizers`, wrapped in transformers'
    PreTrainedTokenizerFast with `chat_template`, saved with `save_pretrained` into `folder`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))
    return fast


def run_both(item, inputs: list[torch.Tensor], backend=None) -> tuple[list, list]:
    """Run a lowered graph (folder, GraphDef, manifest entry[, backend]; or `backend` given apart) through
    its runtime and in eager PyTorch on the same inputs; checks the runtime's outputs have the declared
    shapes and dtypes. (Core ML's int64 inputs: `load` casts them to int32.)"""
    import numpy as np

    folder, g, entry, *rest = item
    backend = backend or rest[0]
    got = backend.load(folder, entry)([t.numpy() for t in inputs])
    with torch.no_grad():
        want = [t.numpy() for t in g.module(*inputs)]
    assert len(got) == len(want) == len(entry["outputs"])
    for o, spec in zip(got, entry["outputs"]):
        assert list(o.shape) == spec["shape"] and o.dtype == np.dtype(spec["dtype"])
    return got, want


def assert_close(got, want, names, rtol: float = 1e-5, atol_scale: float = 1e-5) -> None:
    """rtol 1e-5 plus atol 1e-5 of the output's largest finite magnitude: a runtime's float32 accumulation
    order (ORT's, XNNPACK's, Core ML's) differs from torch's (both stay within ~5e-6 of a float64
    reference, relative to the largest value); infinities (the loss head's -inf running max) must match."""
    import numpy as np

    for g, w, n in zip(got, want, names):
        atol = atol_scale * max(1.0, float(np.abs(w[np.isfinite(w)]).max(initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=n)
