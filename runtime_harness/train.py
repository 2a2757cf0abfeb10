"""Fine-tune through the exported graphs, exactly as a phone would: one `train_step` schedule per batch.

1. read the data (`runtime_harness.data`: text, chat, prompt-completion or tokens JSONL), padded rows of
   seq_len; the eval data from its own file or a held-out fraction;
2. on `resume`, take the LoRA tensors, the optimizer state (`optim.i.*` store tensors: AdamW's step and
   moments; SGD has none), the step count and the run's settings from the run folder;
3. run `steps` steps; the batch of global step k is a function of (seed, k) only (`data.batch_rows`),
   so a resumed run continues the same sequence of batches;
4. every `eval_every` steps and at the end, the eval loss through the bundle's `eval_loss` schedule
   (the token-weighted mean over the eval rows); the adapter with the best eval loss is kept;
5. write loss.csv / loss.png, adapter/ and adapter-best/ (PEFT), optimizer.safetensors and
   train_state.json into a staging folder, then move them into `out` (nothing half-written). On Ctrl-C
   (or SIGTERM / SIGHUP) the completed steps are saved the same way and the result says `interrupted`;
   interrupted before the first step completes, nothing is written.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from exporter.adapter import ADAPTER_CONFIG, read_adapter, write_adapter
from exporter.progress import progress as progress_bar
from runtime_harness.data import (ByteCodec, Dataset, eval_batches, batch_rows, hold_out, load_codec,
                                  load_dataset)
from runtime_harness.runner import BundleError, BundleRunner

DEFAULT_LR = {"sgd": 1e-2, "adamw": 1e-3}
EVALS_PER_RUN = 10  # default eval_every = steps // EVALS_PER_RUN
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# the settings a resumed run takes from the run it continues (unless given again)
RESUMED = ("data", "format", "eval_data", "eval_fraction", "eval_every", "seed", "lr")


@dataclass
class TrainConfig:
    """One `train` run; None means "the default" (or, with `resume`, the resumed run's value)."""
    bundle: Path
    steps: int  # steps to run now (a resumed run continues its step count)
    data: Path | None = None
    out: Path | None = None  # default: the resumed run folder, else runs/<bundle name>-train
    lr: float | None = None  # default: DEFAULT_LR[optimizer]
    runtime: str | None = None
    seed: int | None = None  # default 0
    format: str | None = None  # default: detected from the content
    eval_data: Path | None = None
    eval_fraction: float | None = None
    eval_every: int | None = None  # default: steps // EVALS_PER_RUN (at least 1) when there is eval data
    resume: Path | None = None


# -- kept for bench: plain text as windows -----------------------------------------------------------

def tokenize(bundle: Path, manifest: dict, text: str) -> np.ndarray:
    """Token ids of `text`: the bundle's Hugging Face tokenizer, or UTF-8 bytes when it has none."""
    return np.asarray(load_codec(bundle, manifest).encode(text), dtype=np.int64)


def windows(ids: np.ndarray, batch: int, seq_len: int) -> np.ndarray:
    """(n, batch, seq_len) non-overlapping windows."""
    per = batch * seq_len
    n = len(ids) // per
    if n == 0:
        raise BundleError(f"the text has {len(ids)} tokens; one step needs {per} (batch {batch} x sequence {seq_len})")
    return ids[:n * per].reshape(n, batch, seq_len)


# -- adapter and optimizer state ---------------------------------------------------------------------

def lora_tensors(runner: BundleRunner, store: dict) -> dict[str, np.ndarray]:
    """The store's LoRA parameters by PEFT's saved names."""
    return {t["init"]["adapter"]: np.asarray(store[t["name"]]) for t in runner.manifest["state"] if "adapter" in t["init"]}


def optimizer_names(runner: BundleRunner) -> list[str]:
    """Store names of the optimizer state (`optim.i.step`, `optim.i.exp_avg.*`, ...; none for SGD)."""
    return [t["name"] for t in runner.manifest["state"] if "adapter" not in t["init"]]


def save_adapter(runner: BundleRunner, tensors: dict[str, np.ndarray], folder: Path) -> Path:
    import torch

    config = json.loads((runner.bundle / runner.manifest["adapter"] / ADAPTER_CONFIG).read_text())
    write_adapter(folder, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, config)
    return folder


def _adapter_arrays(folder: Path) -> dict[str, np.ndarray]:
    try:
        return {k: v.numpy() for k, v in read_adapter(folder)[1].items()}
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"cannot read the adapter in {folder}: {e.__class__.__name__}: {str(e)[:120]}") from None


def plot_losses(curves: dict, path: Path, title: str) -> None:
    """One line per curve: a list of losses (steps 1..n) or a (steps, losses) pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        xs, ys = curve if isinstance(curve, tuple) else (range(1, len(curve) + 1), curve)
        ax.plot(xs, ys, label=label, marker="o" if isinstance(curve, tuple) and len(xs) < 40 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_run_dir(bundle: Path) -> Path:
    """Where a run of `bundle` goes without --out (or --resume): runs/<bundle name>-train."""
    return Path("runs") / f"{Path(bundle).name}-train"


# -- the run -----------------------------------------------------------------------------------------

def _resumed_config(config: TrainConfig) -> tuple[TrainConfig, dict]:
    path = Path(config.resume) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{config.resume} is not a train run folder (no {STATE_FILE})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    given = {k: getattr(config, k) for k in RESUMED if getattr(config, k) is not None}
    taken = {k: (Path(state[k]) if k in ("data", "eval_data") and state[k] else state[k]) for k in RESUMED}
    return replace(config, **{**taken, **given}, out=config.out or Path(config.resume)), state


def _datasets(config: TrainConfig, runner: BundleRunner, codec) -> tuple[Dataset, Dataset | None]:
    m = runner.manifest
    vocab, seq_len = m["model"]["architecture"]["vocab_size"], m["seq_len"]
    data = load_dataset(config.data, codec, seq_len, vocab, config.format)
    if config.eval_data is not None and config.eval_fraction is not None:
        raise BundleError("give --eval-data or --eval-fraction, not both")
    evaluation = None
    if config.eval_data is not None:
        evaluation = load_dataset(config.eval_data, codec, seq_len, vocab, config.format)
    elif config.eval_fraction is not None:
        data, evaluation = hold_out(data, config.eval_fraction, config.seed, m["batch"])
    if len(data) < m["batch"]:
        raise BundleError(f"{config.data} has {len(data)} example(s); one step needs a batch of {m['batch']}")
    return data, evaluation


def evaluate(runner: BundleRunner, store: dict, batches: list) -> float:
    """Mean loss over every counted eval token: sum_b loss_b n_b / sum_b n_b (the schedule returns batch means)."""
    total = counted = 0.0
    for ids, labels, n in batches:
        loss, _ = runner.step(store, ids, labels, 0.0, schedule="eval_loss")
        total, counted = total + loss * n, counted + n
    return total / counted


def train(config: TrainConfig, adapter: dict[str, np.ndarray] | None = None, progress: bool | str = True) -> dict:
    """Run `config.steps` training steps (continuing `config.resume` if given); returns a summary with
    `interrupted` set when Ctrl-C (or SIGTERM / SIGHUP) stopped it after at least one completed step.

    `progress`: True (a bar), False (nothing), or a mode of `exporter.progress` ("lines" off a terminal)."""
    state = {}
    if config.resume is not None:
        config, state = _resumed_config(config)
    config = replace(config, seed=0 if config.seed is None else config.seed,
                     out=config.out or default_run_dir(config.bundle))
    if isinstance(config.steps, bool) or not isinstance(config.steps, int) or config.steps <= 0:
        raise BundleError(f"--steps must be a positive integer, got {config.steps}")
    if config.lr is not None and not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr)
                                      and config.lr > 0):
        raise BundleError(f"--lr must be a positive finite number, got {config.lr}")
    if config.data is None:
        raise BundleError("train needs --data FILE (or --resume RUN_DIR)")
    runner = BundleRunner(config.bundle, config.runtime)
    m = runner.manifest
    lr = DEFAULT_LR[m["optimizer"]["name"]] if config.lr is None else config.lr
    codec = load_codec(config.bundle, m)
    data, evaluation = _datasets(config, runner, codec)
    if state and state["data_sha256"] != data.sha256:
        raise BundleError(f"{config.data} is not the data {config.resume} was trained on (its sha256 differs), "
                          "so the run cannot continue where it stopped")
    if config.eval_every is not None and (config.eval_every <= 0 or evaluation is None):
        raise BundleError("--eval-every needs a positive count and --eval-data or --eval-fraction")
    every = config.eval_every or max(1, config.steps // EVALS_PER_RUN)
    batches = eval_batches(evaluation, m["batch"]) if evaluation is not None else None

    # -- state: LoRA (and optimizer moments, step count, best adapter when resuming)
    if state:
        adapter = _adapter_arrays(Path(config.resume) / "adapter")
    elif adapter is None:
        adapter = _adapter_arrays(Path(config.bundle) / m["adapter"])
    store = runner.initial_state(adapter)
    if state:
        _load_optimizer(runner, store, Path(config.resume) / OPTIMIZER_FILE)
    best = state.get("best")
    best_lora = _adapter_arrays(Path(config.resume) / "adapter-best") if best else None
    rows = [tuple(r) for r in state.get("rows", [])]  # (step, loss, seconds, eval_loss | None)
    start = int(state.get("step", 0))

    runner.load_all()
    mode = progress if isinstance(progress, str) else ("bar" if progress else "off")
    bar = progress_bar(range(start, start + config.steps), "train", "steps", mode)
    done, interrupted = 0, False
    try:
        for step in bar:
            picked = batch_rows(len(data), m["batch"], config.seed, step)
            t0 = time.perf_counter()
            step_store = dict(store)  # the step replaces tensors, never mutates them: all or nothing
            loss, _ = runner.step(step_store, data.ids[picked], data.labels[picked], lr)
            seconds = time.perf_counter() - t0
            eval_loss = None
            if batches is not None and ((step + 1) % every == 0 or step + 1 == start + config.steps):
                eval_loss = evaluate(runner, dict(step_store), batches)
            store = step_store
            if eval_loss is not None and (best is None or eval_loss < best["eval_loss"]):
                best = {"step": step + 1, "eval_loss": eval_loss}
                best_lora = {k: v.copy() for k, v in lora_tensors(runner, store).items()}
            rows.append((step + 1, loss, seconds, eval_loss))
            done += 1
            bar.set_postfix(loss=f"{loss:.4f}", **({} if eval_loss is None else {"eval": f"{eval_loss:.4f}"}))
    except KeyboardInterrupt:
        if not done:
            raise
        interrupted = True
    finally:
        bar.close()

    new_state = {"step": start + done, "bundle": str(config.bundle), "lr": lr, "seed": config.seed,
                 "format": data.format, "data": str(config.data), "data_sha256": data.sha256,
                 "eval_data": None if config.eval_data is None else str(config.eval_data),
                 "eval_fraction": config.eval_fraction, "eval_every": every if batches is not None else None,
                 "best": best, "rows": rows}
    title = f"{m['model']['name']} / {m['backend']} / {m['optimizer']['name']} lr {lr:g}"
    try:
        write_run(runner, store, best_lora, new_state, Path(config.out), title)
    except OSError as e:  # a full disk, an output that went away: write_run left nothing behind
        raise BundleError(f"cannot write the run to {config.out}: {e.strerror or e}") from None
    losses = [r[1] for r in rows[len(rows) - done:]]
    return {"losses": losses, "step_seconds": [r[2] for r in rows[len(rows) - done:]], "interrupted": interrupted,
            "steps_asked": config.steps,
            "adapter": str(Path(config.out) / "adapter"), "lr": lr, "examples": len(data),
            "eval_examples": 0 if evaluation is None else len(evaluation), "format": data.format,
            "truncated": data.truncated + (evaluation.truncated if config.eval_data is not None else 0),
            "first_step": start + 1, "best": best, "out": str(config.out),
            "tokenizer": "bytes" if isinstance(codec, ByteCodec) else "tokenizer",
            "runtime": runner.backend.runtime or runner.backend.name}


def _load_optimizer(runner: BundleRunner, store: dict, path: Path) -> None:
    names = optimizer_names(runner)
    if not names:
        return
    from safetensors.numpy import load_file

    try:
        saved = load_file(str(path))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read the optimizer state {path}: {e}") from None
    for name in names:
        if name not in saved or saved[name].shape != store[name].shape:
            raise BundleError(f"the optimizer state in {path} does not fit this bundle (no {name} of shape "
                              f"{list(store[name].shape)}); was the run trained with another bundle?")
        runner.put(store, name, saved[name].astype(store[name].dtype))


def write_run(runner: BundleRunner, store: dict, best_lora: dict | None, state: dict, out: Path, title: str) -> None:
    """Write every output into a staging folder beside `out`, then move each into `out`, replacing the
    earlier version only once the new one is complete."""
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        save_adapter(runner, lora_tensors(runner, store), stage / "adapter")
        if best_lora is not None:
            save_adapter(runner, best_lora, stage / "adapter-best")
        names = optimizer_names(runner)
        if names:
            save_file({n: np.ascontiguousarray(np.asarray(store[n])) for n in names}, str(stage / OPTIMIZER_FILE))
        with open(stage / "loss.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "seconds", "eval_loss"])
            w.writerows([s, f"{l:.6f}", f"{t:.4f}", "" if e is None else f"{e:.6f}"] for s, l, t, e in state["rows"])
        curves = {"train": ([r[0] for r in state["rows"]], [r[1] for r in state["rows"]])}
        evals = [(r[0], r[3]) for r in state["rows"] if r[3] is not None]
        if evals:
            curves["eval"] = ([s for s, _ in evals], [e for _, e in evals])
        plot_losses(curves, stage / "loss.png", title)
        (stage / STATE_FILE).write_text(json.dumps(state, indent=1))
        out.mkdir(exist_ok=True)
        for item in sorted(stage.iterdir(), key=lambda p: p.name == STATE_FILE):  # the state file last
            target = out / item.name
            old = out / f".{item.name}.old"
            if target.exists():
                target.rename(old)
            item.rename(target)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
