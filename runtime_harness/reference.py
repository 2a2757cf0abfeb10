"""The independent reference: `transformers`' own modules + `peft` LoRA + torch autograd, in float64.

Nothing here uses the project's own math (`graphs/`). The frozen weights come from the checkpoint the
bundle was built from (the manifest's `weights.source`: a folder, a Hugging Face repo id, or
`random (seed N)`, regenerated), never from the bundle's own weight files, so a bundle whose weights
differ from its checkpoint fails `verify`.

`layerwise_loss_and_grads` (what `verify` uses) holds ONE decoder layer at a time:

1. the architecture's classes come from transformers itself: the `*ForCausalLM` of the checkpoint's
   `model_type` is instantiated on the meta device (no memory) to find its decoder-layer, final-norm
   and rotary-embedding classes; a new family plugs in with no change here as long as its decoder
   layer takes `(hidden_states, attention_mask, position_ids, position_embeddings)`;
2. embedding: x_0 = E[ids], reading E in row blocks;
3. forward, i = 0..L-1: build layer i (meta, then its float64 weights assigned), inject PEFT LoRA
   (`peft.inject_adapter_in_model`), x_{i+1} = layer_i(x_i); keep only x_i, drop the layer;
4. loss head in vocabulary row blocks, float64: h = norm(x_L), z = h E^T,
   loss = mean over labelled positions of (logsumexp(z_t) - z_t[label_t]) (HF's shift: position t
   predicts label t+1). d loss / d h by autograd per row block: with lse held constant,
   d/dh sum_v exp(z_tv - lse_t) = softmax(z_t) E, so the blocks' gradients add up to the exact one;
5. backward, i = L-1..0: rebuild layer i, recompute y = layer_i(x_i) with autograd, y.backward(dy),
   read the LoRA gradients (PEFT names) and dy <- dx_i.

Everything is float64 end to end: the rotary cos/sin too (transformers computes them in float32),
and the loss (transformers' `ForCausalLMLoss` casts logits to float32).

`whole_model` / `peft_model` / `whole_model_loss_and_grads` keep the plain whole-model
transformers + PEFT path: the tests check the layer-by-layer reference against it on tiny models,
and `bench` times it as the eager autograd baseline.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from exporter.weights import EMBEDDING, FINAL_NORM, LM_HEAD, RandomWeights, WeightSource, open_weights

RANDOM_PREFIX = "random (seed "
ROW_BLOCK = 16384  # vocabulary rows per block of the embedding and loss head


class ReferenceError(ValueError):
    """The checkpoint a bundle was built from cannot be found, or has changed since the build."""


# ------------------------------------------------------------------------------------------ weights

def source_weights(manifest: dict, dequantized: bool = True) -> WeightSource:
    """The frozen weights the bundle was built from: its recorded source, checked against its content hash.
    For a quantized bundle (`weights.format`), as the bundle computes with them: dequantized from the codes
    the build made of that checkpoint (`dequantized=False`: the float checkpoint itself)."""
    from exporter.weights import WeightsError
    from graphs.config import ModelSpec

    spec = ModelSpec(**manifest["model"]["architecture"])
    info = manifest["weights"]
    source = info["source"]
    if source.startswith(RANDOM_PREFIX):
        weights = RandomWeights(spec, int(source[len(RANDOM_PREFIX):-1]))
        return _as_bundle(weights, manifest) if dequantized else weights
    try:
        weights = open_weights(source.removeprefix("hf://"), spec)
    except WeightsError as e:
        raise ReferenceError(f"the checkpoint this bundle was built from is needed: {e}") from None
    recorded = info.get("sha256")
    if recorded is not None and weights.content_sha256() != recorded:
        raise ReferenceError(f"checkpoint {source} has changed since the bundle was built "
                             f"(sha256 {weights.content_sha256()[:12]}..., the manifest records {recorded[:12]}...)")
    return _as_bundle(weights, manifest) if dequantized else weights


def _as_bundle(weights: WeightSource, manifest: dict) -> WeightSource:
    from exporter.weights import DequantizedWeights
    from graphs.quant import QuantFormat

    fmt = manifest["weights"].get("format")
    return weights if fmt is None else DequantizedWeights(weights, QuantFormat(fmt["scheme"], fmt["group_size"]))


def hf_config(manifest: dict):
    """The checkpoint's own transformers config of its text model (eager attention). A multimodal
    checkpoint (Gemma-3-4b's `Gemma3ForConditionalGeneration`) contributes its `text_config`."""
    import transformers

    fields = dict(manifest["model"]["hf_config"])
    if isinstance(fields.get("text_config"), dict):
        text = dict(fields["text_config"])
        text.setdefault("tie_word_embeddings", fields.get("tie_word_embeddings", True))
        text["model_type"] = manifest["model"]["architecture"]["model_type"]
        fields = text
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        fields.pop(key, None)
    config = transformers.AutoConfig.for_model(model_type, **fields)
    config._attn_implementation = "eager"
    return config


# ---------------------------------------------------------------------------------- the architecture

class Architecture:
    """transformers' classes for one checkpoint: decoder layer, final norm, rotary embedding, and what the
    model does around its layers: the embedding scale (Gemma) and each layer's attention type (full or
    sliding window, each with its own mask and RoPE)."""

    def __init__(self, config):
        import transformers

        self.config = config
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        base = model.base_model
        self.layer_cls = type(base.layers[0])
        self._norm = base.norm
        self._rotary = base.rotary_emb
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        # Gemma's scaled embedding: transformers multiplies by a float32 tensor cast to the weights' dtype
        scale = getattr(base.embed_tokens, "scalar_embed_scale", None)
        self.embed_scale = None if scale is None else float(torch.tensor(scale, dtype=torch.float32))

    def masks(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer type -> transformers' eager attention mask for it (causal; sliding-window causal)."""
        return {kind: _mask(kind, self.config, x, positions) for kind in set(self.layer_types)}

    def layer(self, index: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Decoder layer `index` in float64 holding `weights` (names relative to the layer)."""
        with torch.device("meta"):
            layer = self.layer_cls(self.config, layer_idx=index)
        layer.load_state_dict({k: v.to(torch.float64) for k, v in weights.items()}, strict=True, assign=True)
        left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{self.layer_cls.__name__}: tensors without values: {left[:3]}")
        return layer.requires_grad_(False)

    def norm(self, weight: torch.Tensor) -> torch.nn.Module:
        norm = copy.deepcopy(self._norm)  # transformers' final norm (its eps), on meta: then a real weight
        norm.load_state_dict({"weight": weight.to(torch.float64)}, strict=True, assign=True)
        return norm.requires_grad_(False)

    def position_embeddings(self, positions: torch.Tensor, dtype=torch.float64, layer_type: str = "full_attention"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of shape (B, S, head_dim) for layers of `layer_type`, float64 (transformers' rotary
        module computes them in float32).

        Default RoPE: inv_freq_j = theta^(-2j/d) recomputed in float64, as transformers'
        `compute_default_rope_parameters` defines it; other RoPE types take transformers' inv_freq. A model
        whose RoPE differs per layer type (Gemma-3: `rope_parameters[layer_type]`, `<type>_inv_freq`) reads
        that type's."""
        rotary = type(self._rotary)(config=self.config)
        params = self.config.rope_parameters
        per_type = layer_type in params and isinstance(params[layer_type], dict)
        params = params[layer_type] if per_type else params
        prefix = f"{layer_type}_" if per_type else ""
        if params.get("rope_type", "default") == "default":
            theta = params["rope_theta"]
            dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        else:
            inv_freq = getattr(rotary, f"{prefix}inv_freq").to(torch.float64)
        freqs = positions[..., None].to(torch.float64) * inv_freq  # (B, S, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, d)
        scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _lora_config(manifest: dict):
    import peft

    from graphs.config import TARGET_MODULES

    lora = manifest["lora"]
    return peft.LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none",
                           target_modules=[TARGET_MODULES[t].split(".")[-1] for t in lora["targets"]])


def _with_lora(layer: torch.nn.Module, index: int, manifest: dict, adapter: dict[str, np.ndarray]) -> list:
    """Inject PEFT LoRA into `layer` and load layer `index`'s PEFT-named tensors; returns [(PEFT name, param)]."""
    import peft

    peft.inject_adapter_in_model(_lora_config(manifest), layer)
    layer.to(torch.float64)
    prefix = f"base_model.model.model.layers.{index}."
    params = []
    for name, p in layer.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
            continue
        peft_name = prefix + name.replace(".default", "")
        if peft_name not in adapter:
            raise ValueError(f"the adapter lacks {peft_name}")
        with torch.no_grad():
            p.copy_(torch.as_tensor(np.asarray(adapter[peft_name]), dtype=torch.float64))
        p.requires_grad_(True)
        params.append((peft_name, p))
    return params


# ------------------------------------------------------------------------------------- the reference

def _mask(layer_type: str, config, x: torch.Tensor, positions: torch.Tensor):
    """transformers' mask for a layer type: causal, or causal within `config.sliding_window` positions."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    make = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
    mask = make(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=positions,
                allow_is_causal_skip=False)
    if mask is None:
        raise RuntimeError(f"transformers returned no {layer_type} mask for eager attention")
    return mask


def _embed(weights: WeightSource, ids: torch.Tensor, hidden: int, scale: float | None = None) -> torch.Tensor:
    """x_0 = E[ids] (times the model's embedding scale, if any), float64, reading E in blocks of rows."""
    vocab = weights.spec.vocab_size
    x = torch.zeros(*ids.shape, hidden, dtype=torch.float64)  # (B, S, H)
    for start in range(0, vocab, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, vocab)
        hit = (ids >= start) & (ids < stop)
        if hit.any():
            x[hit] = weights.rows(EMBEDDING, start, stop).to(torch.float64)[ids[hit] - start]
    return x if scale is None else x * scale


def _head(weights: WeightSource, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d h) for h (N, H) float64 and next-token labels (N,) (-100: ignored), in row blocks."""
    name = EMBEDDING if weights.spec.tie_word_embeddings else LM_HEAD
    vocab = weights.spec.vocab_size
    valid = labels != -100
    count = int(valid.sum())
    if count == 0:
        raise ValueError("every label is -100: the loss is undefined")
    lse = torch.full(labels.shape, -torch.inf, dtype=torch.float64)  # (N,)
    label_logit = torch.zeros(labels.shape, dtype=torch.float64)  # (N,)
    blocks = [(s, min(s + ROW_BLOCK, vocab)) for s in range(0, vocab, ROW_BLOCK)]
    with torch.no_grad():
        for start, stop in blocks:
            z = h @ weights.rows(name, start, stop).to(torch.float64).T  # (N, rows)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            hit = valid & (labels >= start) & (labels < stop)
            label_logit[hit] = z[hit, labels[hit] - start]
    loss = (lse - label_logit)[valid].sum() / count
    dh = torch.zeros_like(h)
    for start, stop in blocks:
        hh = h.detach().requires_grad_(True)
        z = hh @ weights.rows(name, start, stop).to(torch.float64).T  # (N, rows)
        hit = valid & (labels >= start) & (labels < stop)
        part = (torch.exp(z - lse[:, None]) * valid[:, None]).sum() - z[hit, labels[hit] - start].sum()
        (part / count).backward()
        dh += hh.grad
    return loss, dh


def layerwise_loss_and_grads(manifest: dict, weights: WeightSource, adapter: dict[str, np.ndarray],
                             input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Causal-LM loss and every LoRA gradient (PEFT names, float64), one decoder layer in memory at a time."""
    config = hf_config(manifest)
    arch = Architecture(config)
    L = config.num_hidden_layers
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)  # (B, S)
    B, S = ids.shape
    positions = torch.arange(S).unsqueeze(0).expand(B, S)  # (B, S)
    xs = [_embed(weights, ids, config.hidden_size, arch.embed_scale)]  # x_0 (B, S, H)
    masks = arch.masks(xs[0], positions)
    ropes = {kind: arch.position_embeddings(positions, layer_type=kind) for kind in masks}

    def run_layer(i: int, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        layer = arch.layer(i, weights.layer(i))
        params = _with_lora(layer, i, manifest, adapter)
        kind = arch.layer_types[i]
        return layer(x, attention_mask=masks[kind], position_ids=positions, position_embeddings=ropes[kind]), params

    with torch.no_grad():
        for i in range(L):
            xs.append(run_layer(i, xs[i])[0])
    # loss head: HF's shift (position t predicts label t + 1)
    shifted = torch.full((B, S), -100, dtype=torch.long)
    shifted[:, :-1] = torch.as_tensor(np.asarray(labels), dtype=torch.long)[:, 1:]
    x_last = xs.pop().requires_grad_(True)
    h = arch.norm(weights.tensor(FINAL_NORM))(x_last)  # (B, S, H)
    loss, dh = _head(weights, h.detach().reshape(B * S, -1), shifted.reshape(-1))
    h.backward(dh.reshape(B, S, -1))
    dy = x_last.grad
    grads: dict[str, np.ndarray] = {}
    for i in reversed(range(L)):
        x = xs.pop().requires_grad_(True)
        y, params = run_layer(i, x)
        y.backward(dy)
        grads.update({name: p.grad.detach().numpy().copy() for name, p in params})
        dy = x.grad
        del y, params  # layer i's weights go before layer i - 1's are read
    return float(loss), grads


# ------------------------------------------------------------------------ whole model (tests, bench)

class _Float64Rotary(torch.nn.Module):
    """Stands in for transformers' rotary module: the same (cos, sin), computed in float64."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str = "full_attention"):
        return self.arch.position_embeddings(position_ids, x.dtype, layer_type)


def whole_model(manifest: dict, weights: WeightSource | None = None, dtype=torch.float64):
    """The bundle's frozen model as one transformers `*ForCausalLM` (eager attention) holding every layer."""
    import transformers

    weights = weights or source_weights(manifest)
    config = hf_config(manifest)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    spec = weights.spec
    state = {EMBEDDING: weights.tensor(EMBEDDING), FINAL_NORM: weights.tensor(FINAL_NORM)}
    state[LM_HEAD] = state[EMBEDDING] if spec.tie_word_embeddings else weights.tensor(LM_HEAD)
    for i in range(spec.num_layers):
        state.update({f"model.layers.{i}.{n}": t for n, t in weights.layer(i).items()})
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if spec.tie_word_embeddings:
        model.tie_weights()
    if dtype == torch.float64:  # transformers' rotary module computes cos/sin in float32
        model.model.rotary_emb = _Float64Rotary(Architecture(config))
    else:
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were on meta
    embed = model.model.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):  # Gemma's non-persistent scale buffer was on meta too
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: tensors without values: {left[:3]}")
    return model.eval()


def peft_model(model, manifest: dict, adapter_tensors: dict[str, np.ndarray]):
    """Wrap `model` with PEFT LoRA as the manifest configures it, loaded with PEFT-named tensors."""
    import peft

    wrapped = peft.get_peft_model(model, _lora_config(manifest))
    dtype = next(model.parameters()).dtype
    wrapped.to(dtype)
    result = peft.set_peft_model_state_dict(
        wrapped, {k: torch.as_tensor(np.asarray(v), dtype=dtype) for k, v in adapter_tensors.items()})
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter tensors not in the model: {result.unexpected_keys[:3]}")
    return wrapped


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss in the logits' own dtype: mean over t of CE(logits[:, t], labels[:, t + 1]), -100 ignored."""
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def whole_model_loss_and_grads(wrapped, input_ids: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Causal-LM loss (from the model-dtype logits) and the gradient of every LoRA tensor, by PEFT's saved names."""
    wrapped.zero_grad(set_to_none=True)
    logits = wrapped(input_ids=torch.as_tensor(input_ids, dtype=torch.long)).logits
    loss = causal_lm_loss(logits, torch.as_tensor(labels, dtype=torch.long))
    loss.backward()
    grads = {}
    for name, p in wrapped.named_parameters():
        if "lora_" in name and p.grad is not None:
            grads[name.replace(".default", "")] = p.grad.detach().numpy().copy()
    return float(loss.detach()), grads


def loss_only(wrapped, input_ids: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        logits = wrapped(input_ids=torch.as_tensor(input_ids, dtype=torch.long)).logits
        return float(causal_lm_loss(logits, torch.as_tensor(labels, dtype=torch.long)))
