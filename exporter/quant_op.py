"""`ondevice_lora::dequantize`: one op for "this whole matrix, dequantized", for graphs whose quantized
weights are constants (Core ML's per-layer packages).

Its value is `graphs.quant.dequantize` ((q - z) * s, float32). A graph built with baked quantized weights
calls it once per matrix, so a converter sees the codes, scales and zero points of each matrix as one
node with constant inputs and can store them in its own compressed form (Core ML:
`constexpr_blockwise_shift_scale`, see `exporter.backends.coreml`) instead of folding the float32
result into a constant. Graphs whose weights are inputs (ExecuTorch, ONNX Runtime) never use it: they
dequantize per block with ordinary ops (`graphs.quant.QuantizedWeight`).
"""
from __future__ import annotations

import torch

from graphs import quant


@torch.library.custom_op("ondevice_lora::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """(q - z) * s of one stored matrix: qweight (N, K bits / 8) uint8, scales / zeros (N, G) -> (N, K) float32."""
    return quant.dequantize(qweight, scales, zeros, bits)


@dequantize.register_fake
def _(qweight, scales, zeros, bits):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * (8 // bits)), dtype=torch.float32)
