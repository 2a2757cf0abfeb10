"""Peak memory of the hand-derived (MeSP) layer backward against the autodiff (MeBP) one, on a
Qwen2.5-0.5B-shaped layer at sequence 256 (float32, LoRA rank 8 on all seven projections)."""
from __future__ import annotations

import torch

from exporter.registry import MODELS
from graphs import qwen2
from graphs.config import LoraConfig
from graphs.memory import peak_allocated_bytes


def test_tracker_counts_new_storages_not_views():
    _, peak = peak_allocated_bytes(lambda: (torch.ones(1000, 1000) + 1).view(-1)[:10])
    assert peak == 2 * 4_000_000


def test_structured_backward_peak_is_well_below_autodiff():
    spec, lora_cfg = MODELS["qwen2.5-0.5b"], LoraConfig()
    W = {n: torch.randn(s) * 0.02 for n, s in spec.layer_weight_shapes().items()}
    lora = {n: torch.randn(s) * 0.02 for n, s in lora_cfg.layer_lora_shapes(spec).items()}
    x = torch.randn(1, 256, spec.hidden_size)
    dy = torch.randn_like(x)
    with torch.no_grad():
        (dx, grads), mesp = peak_allocated_bytes(qwen2.decoder_layer_backward, x, dy, W, lora, spec, lora_cfg.scale, 4)
    (dx_ad, grads_ad), mebp = peak_allocated_bytes(qwen2.decoder_layer_backward_autodiff, x, dy, W, lora, spec,
                                                   lora_cfg.scale)
    print(f"\nQwen2.5-0.5B layer backward, seq 256: structured {mesp / 1e6:.1f} MB, autodiff {mebp / 1e6:.1f} MB "
          f"({mesp / mebp:.2f}x)")
    assert torch.allclose(dx, dx_ad, rtol=1e-4, atol=1e-6)
    assert mesp <= 0.5 * mebp
