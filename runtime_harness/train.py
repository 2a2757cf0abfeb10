"""Fine-tune through the exported graphs, exactly as a phone would: one `train_step` schedule per batch.

1. tokenize the text (the bundle's tokenizer; a tiny test model without one uses bytes);
2. cut it into windows of the bundle's sequence length (labels = input ids; the loss head shifts);
3. run `--steps` steps in a seeded order over the windows, with a progress bar;
4. write the loss curve (CSV + PNG) and the trained adapter in PEFT format.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from exporter.adapter import ADAPTER_CONFIG, write_adapter
from runtime_harness.runner import BundleError, BundleRunner

DEFAULT_LR = {"sgd": 1e-2, "adamw": 1e-3}


def tokenize(bundle: Path, manifest: dict, text: str) -> np.ndarray:
    """Token ids of `text`: the bundle's Hugging Face tokenizer, or UTF-8 bytes when it has none."""
    vocab = manifest["model"]["architecture"]["vocab_size"]
    if manifest.get("tokenizer"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(bundle / manifest["tokenizer"]))
        ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
    else:
        if vocab < 256:
            raise BundleError(f"the bundle has no tokenizer and its vocabulary ({vocab}) is too small for bytes")
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return ids


def windows(ids: np.ndarray, batch: int, seq_len: int) -> np.ndarray:
    """(n, batch, seq_len) non-overlapping windows."""
    per = batch * seq_len
    n = len(ids) // per
    if n == 0:
        raise BundleError(f"the text has {len(ids)} tokens; one step needs {per} (batch {batch} x sequence {seq_len})")
    return ids[:n * per].reshape(n, batch, seq_len)


def lora_tensors(runner: BundleRunner, store: dict) -> dict[str, np.ndarray]:
    """The store's LoRA parameters by PEFT's saved names."""
    return {t["init"]["adapter"]: store[t["name"]] for t in runner.manifest["state"] if "adapter" in t["init"]}


def save_adapter(runner: BundleRunner, store: dict, out: Path) -> Path:
    import torch

    config = json.loads((runner.bundle / runner.manifest["adapter"] / ADAPTER_CONFIG).read_text())
    folder = out / "adapter"
    write_adapter(folder, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in lora_tensors(runner, store).items()},
                  config)
    return folder


def plot_losses(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(bundle: Path, text: str, steps: int, out: Path, lr: float | None = None, runtime: str | None = None,
          adapter: dict[str, np.ndarray] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run `steps` training steps; returns {"losses": [...], "adapter": folder, ...}."""
    if steps <= 0:
        raise BundleError(f"--steps must be positive, got {steps}")
    runner = BundleRunner(bundle, runtime)
    m = runner.manifest
    lr = DEFAULT_LR[m["optimizer"]["name"]] if lr is None else lr
    data = windows(tokenize(bundle, m, text), m["batch"], m["seq_len"])
    if adapter is None:
        from exporter.adapter import read_adapter

        adapter = {k: v.numpy() for k, v in read_adapter(bundle / m["adapter"])[1].items()}
    store = runner.initial_state(adapter)
    runner.load_all()
    order = np.random.default_rng(seed).permutation(len(data))
    out.mkdir(parents=True, exist_ok=True)
    losses, seconds = [], []
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress)
    for k in bar:
        batch = data[order[k % len(data)]]
        t0 = time.perf_counter()
        loss, _ = runner.step(store, batch, batch, lr)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "seconds"])
        w.writerows([k + 1, f"{l:.6f}", f"{s:.4f}"] for k, (l, s) in enumerate(zip(losses, seconds)))
    plot_losses({m["method"]: losses}, out / "loss.png",
                f"{m['model']['name']} / {m['backend']} / {m['optimizer']['name']} lr {lr:g}")
    folder = save_adapter(runner, store, out)
    return {"losses": losses, "step_seconds": seconds, "adapter": str(folder), "lr": lr,
            "windows": int(len(data)), "out": str(out), "runtime": runner.backend.runtime or runner.backend.name}
