"""What a phone can hold: settings whose step cannot fit are refused before anything is traced.

`PHONE_MEMORY_BUDGET_BYTES` (8 GiB) is the RAM of the largest current phones (iPhone 15 Pro and later,
many Android flagships); an app gets less than that, so a call that needs more cannot run on any phone.

`call_lower_bound_bytes` is a lower bound of the bytes one call of the training step holds, computed from
the shapes alone (before lowering; the manifest's planned figures come later and are larger):

    store   = 2 B S H                one layer's input (its checkpoint) and dy; the other checkpoints are
                                     paged (`bundle_format.PAGED`), as are the other layers' LoRA state
            + n_lora (2 + n_state) / L   one layer's LoRA parameters, gradients and optimizer state
    layer   = weights of one layer, as stored (float32, or the int8 / int4 codes with their scales and
              zero points: `graphs.quant.stored_tensors`); with sub-layer calls the larger of the
              attention's and one MLP block's
            + 4 x [mesp: B (nh / nkv) min(S, q) S (scores of one kv group and query block, q the
                   query rows) + B S ceil(I / blocks) (one MLP block)
                   mebp: B nh S^2 + B S I (autograd holds the whole layer's activations)]
    head    = one vocabulary chunk of E as stored (rows x H) + 4 x B S rows (its logits)

    bound   = 4 bytes x store + max(layer, head)
"""
from __future__ import annotations

import math

from graphs.quant import stored_tensors

PHONE_MEMORY_BUDGET_BYTES = 8 * 2**30
_FLOAT = 4
_BYTES = {"float32": 4, "uint8": 1}
_OPTIMIZER_STATE = {"sgd": 0, "adamw": 2}


def _stored_bytes(shapes: dict, fmt) -> int:
    return sum(math.prod(s) * _BYTES[d] for s, d in stored_tensors(shapes, fmt).values())


def call_lower_bound_bytes(shapes) -> int:
    """A lower bound of the peak bytes of one call of `shapes`' training step (see the module docstring)."""
    spec, lora = shapes.spec, shapes.lora
    B, S, H, I = lora.batch, lora.seq_len, spec.hidden_size, spec.intermediate_size
    n_lora = lora.trainable_parameters(spec)
    store = 2 * B * S * H + n_lora * (2 + _OPTIMIZER_STATE.get(shapes.optimizer, 2)) // spec.num_layers
    fmt = shapes.quant
    weights = _stored_bytes(spec.layer_weight_shapes(), fmt)
    if shapes.split_layers:
        from exporter.graph_defs import LayerPart

        weights = max(sum(math.prod(sh) * _BYTES[d] for sh, d in LayerPart(shapes, part).stored.values())
                      for part in ("attention", "mlp_block"))
    if shapes.method == "mebp":
        activations = B * spec.num_heads * S * S + B * S * I
    else:
        rows = S if shapes.query_rows is None else min(S, shapes.query_rows)
        activations = B * (spec.num_heads // spec.num_kv_heads) * rows * S + B * S * math.ceil(I / shapes.mlp_blocks)
    chunk = (shapes.chunk_rows, H)
    head = (_FLOAT * math.prod(chunk) if fmt is None else fmt.nbytes(chunk)) + _FLOAT * B * S * shapes.chunk_rows
    return _FLOAT * store + max(weights + _FLOAT * activations, head)


def check_fits(shapes) -> None:
    """Raise ValueError (one line) when one call cannot fit in a phone's memory."""
    need = call_lower_bound_bytes(shapes)
    if need > PHONE_MEMORY_BUDGET_BYTES:
        raise ValueError(f"one call of this training step needs at least {need / 2**30:.1f} GiB, more than a phone "
                         f"has ({PHONE_MEMORY_BUDGET_BYTES / 2**30:.0f} GiB); lower --seq-len"
                         f"{' or use --method mesp' if shapes.method == 'mebp' else ''}")
